#!/bin/bash
# Connected-cluster data preparation for examples/tinystories_*.yaml (needs the Hugging Face hub):
#   bash examples/data_tinystories_bilingual.sh /data/tinystories [WORKERS]
# 1. a byte-level BPE (8192, the configs' vocab_size) trained on a mixed sample of the three languages
#    (the full recipe lists English first: its first documents would be English only);
# 2. the full corpus, streamed from the hub, tokenized on WORKERS processes;
# 3. P(forget) tags from a linear classifier trained on 2000 ground-truth documents (the configs' default
#    data.score_source=tagged). Then:
#    torchrun --nproc-per-node 8 -m megatron_sgtm.cli train --config examples/tinystories_64m_gpt2.yaml \
#        --data.path=/data/tinystories/tagged
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [WORKERS]}
workers=${2:-$(nproc)}
recipe=$(dirname "$0")/data_tinystories_bilingual.yaml
sample=$(mktemp -d)/sample.yaml
python - "$recipe" "$sample" <<'PY'
import sys, yaml
recipe = yaml.safe_load(open(sys.argv[1]))
for source in recipe["sources"]:
    source["limit"] = 20000
yaml.safe_dump(recipe, open(sys.argv[2], "w"))
PY
megatron-sgtm data build --recipe "$sample" --train-tokenizer 8192 --out "$out/tokenizer-sample" --workers "$workers"
megatron-sgtm data build --recipe "$recipe" --tokenizer "$out/tokenizer-sample/tokenizer.json" \
    --out "$out/shards" --workers "$workers"
megatron-sgtm data tag --shards "$out/shards" --out "$out/tagged" --classifier linear --train-from-truth 2000 \
    --forget-categories spanish --workers "$workers"
