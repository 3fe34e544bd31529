"""Data-path throughput: loader tokens/s per data-parallel rank and tagging documents/s.

    python tools/bench_data.py [--num-docs 40000] [--seq-length 2048] [--workdir DIR]

Builds a synthetic corpus (generator + BPE + shards), then times (1) the sampler producing packed
micro-batches with label tensors on one rank, in both modes and at DP=4, (2) the linear classifier
alone and (3) `megatron-sgtm data tag` end to end (read shard, score, write tagged shard) with 1 and
2 worker processes. Run it from the repository root (or with the package installed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron_sgtm.data.build import build_shards
from megatron_sgtm.data.classifiers import LinearClassifier
from megatron_sgtm.data.corpus import load_corpus
from megatron_sgtm.data.labeling import LabelingConfig, label_corpus
from megatron_sgtm.data.sampler import SGTMSampler, document_attention_mask
from megatron_sgtm.data.shards import Manifest, read_shard
from megatron_sgtm.data.synthetic import generate
from megatron_sgtm.data.tokenizer import train_bpe


def timed(fn, min_seconds: float = 2.0) -> tuple[int, float]:
    """Run ``fn`` (returning a work count) until ``min_seconds`` pass; (total work, seconds)."""
    work, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds:
        work += fn()
    return work, elapsed


def bench_loader(corpus, labels, args, **kwargs) -> float:
    sampler = SGTMSampler(corpus, labels, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                          global_batch_size=args.global_batch_size, seed=0, **kwargs)
    tokens, seconds = timed(lambda: int(next(sampler)["tokens"].numel()))
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-docs", type=int, default=40_000)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the built shards here")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    shards = workdir / "shards"
    if not (shards / "manifest.json").exists():
        tokenizer = train_bpe((d.text for d in generate(5000, seed=0)), args.vocab_size)
        build_shards(generate(args.num_docs, seed=0), tokenizer, shards, docs_per_shard=5000)
    corpus = load_corpus(shards)
    labels = label_corpus(corpus, LabelingConfig(score_source="truth", retain_rate=0.25))
    print(f"corpus: {corpus.num_docs} docs, {int(corpus.offsets[-1]):,} tokens; {os.cpu_count()} CPU cores")

    rows = [
        ("loader, packed, DP=1 (tokens/s per rank)", bench_loader(corpus, labels, args)),
        ("loader, packed, rank 0 of DP=4", bench_loader(corpus, labels, args, dp_rank=0, dp_size=4)),
        ("loader, batch-uniform, DP=1", bench_loader(corpus, labels, args, mode="batch_uniform")),
    ]
    sampler = SGTMSampler(corpus, labels, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                          global_batch_size=args.global_batch_size)

    def with_mask() -> int:
        batch = next(sampler)
        document_attention_mask(batch["position_ids"])
        return int(batch["tokens"].numel())

    tokens, seconds = timed(with_mask)
    rows.append(("loader + [b,1,s,s] attention mask, DP=1", tokens / seconds))

    docs = [d for s in Manifest.read(shards).shards[:2] for d in read_shard(shards / s.name)]
    sample = docs[:2000]
    model = LinearClassifier.train([d.meta["text"] for d in sample],
                                   [int(d.meta["category"] == "spanish") for d in sample])
    model.save(workdir / "classifier.npz")
    texts = [d.meta["text"] for d in docs]

    def score() -> int:
        for i in range(0, len(texts), 1024):
            model.score([], texts[i:i + 1024])
        return len(texts)

    count, seconds = timed(score)
    rows.append(("linear classifier scoring only (docs/s, 1 core)", count / seconds))
    for workers in (1, 2):
        # Through the CLI, as users run it: interpreter and worker start-up are part of the figure.
        out = workdir / f"tagged-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "megatron_sgtm.cli", "data", "tag", "--shards", str(shards), "--out",
                   str(out), "--classifier", "linear", "--model", str(workdir / "classifier.npz"),
                   "--workers", str(workers)]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        rate = corpus.num_docs / (time.perf_counter() - start)
        rows.append((f"`data tag` end to end (read, score, write), {workers} worker(s) (docs/s)", rate))

    print("\n| measurement | rate |\n|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
