#!/bin/bash
# Connected-cluster data preparation for examples/wikipedia_*.yaml (needs the Hugging Face hub):
#   TOPIC_MODEL=org/topic-classifier bash examples/data_wikipedia.sh /data/wiki [WORKERS]
# TOPIC_MODEL: a sequence-classification model whose labels (config.id2label) are the configs' categories,
# biology, chemistry, medicine, environment and other (e.g. one fine-tuned on labelled articles); its index
# for biology is BIOLOGY_LABEL (default 0).
# 1. English Wikipedia streamed from the hub and tokenized on WORKERS processes (byte-level BPE of 32768,
#    the configs' vocab_size, trained on the first 200k articles);
# 2. the topic model, downloaded once, scores every article: P(biology) becomes its score and the top
#    label its category (--label-categories). Then:
#    torchrun --nproc-per-node 8 -m megatron_sgtm.cli train --config examples/wikipedia_254m_gpt2.yaml \
#        --data.path=/data/wiki/tagged
set -euo pipefail
out=${1:?usage: TOPIC_MODEL=... $0 OUT_DIR [WORKERS]}
workers=${2:-$(nproc)}
model=${TOPIC_MODEL:?set TOPIC_MODEL to a hub topic classifier}
megatron-sgtm data build --recipe "$(dirname "$0")/data_wikipedia.yaml" --train-tokenizer 32768 \
    --tokenizer-docs 200000 --workers "$workers" --out "$out/shards"
huggingface-cli download "$model" --local-dir "$out/topic-model"
megatron-sgtm data tag --shards "$out/shards" --out "$out/tagged" --classifier hf --model "$out/topic-model" \
    --forget-label "${BIOLOGY_LABEL:-0}" --label-categories --forget-categories biology --workers "$workers"
