"""Data-path throughput: loader tokens/s per data-parallel rank and tagging documents/s.

    python tools/bench_data.py [--num-docs 40000] [--seq-length 2048] [--workdir DIR]

Builds a synthetic corpus (generator + BPE + shards), then measures (1) the sampler producing packed
micro-batches with label tensors on one rank, in both modes and at DP=4, (2) the linear classifier
alone and (3) `tag_shards` end to end (verify and read shard, score, write tagged shard) with 1 and 2
worker processes. Rates are per CPU-second (the goals are per core; shared machines are noisy),
with wall-clock rates for tagging alongside. Run it from the repository root (or install the package).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from megatron_sgtm.data.build import build_shards
from megatron_sgtm.data.classifiers import LinearClassifier
from megatron_sgtm.data.corpus import load_corpus
from megatron_sgtm.data.shards import Manifest, read_shard
from megatron_sgtm.data.synthetic import generate
from megatron_sgtm.data.tagging import ClassifierSpec, tag_shards
from megatron_sgtm.data.tokenizer import train_bpe


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (tagging workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(fn, min_seconds: float = 2.0) -> tuple[int, float]:
    """Run ``fn`` (returning a work count) for ``min_seconds`` of CPU time; (total work, CPU seconds)."""
    work, start = 0, cpu_seconds()
    while (elapsed := cpu_seconds() - start) < min_seconds:
        work += fn()
    return work, elapsed


def loader_rows(corpus, args) -> list[tuple[str, float]]:
    # Imported here, not at module scope: spawned tagging workers re-import this script, and the
    # sampler pulls in torch, which would add seconds of start-up to every worker.
    from megatron_sgtm.data.labeling import LabelingConfig, label_corpus
    from megatron_sgtm.data.sampler import SGTMSampler
    from megatron_sgtm.training.batch_geometry import document_attention_mask

    labels = label_corpus(corpus, LabelingConfig(score_source="truth", retain_rate=0.25))

    def rate(build_mask: bool = False, **kwargs) -> float:
        sampler = SGTMSampler(corpus, labels, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                              global_batch_size=args.global_batch_size, seed=0, **kwargs)

        def step() -> int:
            batch = next(sampler)
            if build_mask:
                document_attention_mask(batch["position_ids"])
            return int(batch["tokens"].numel())

        tokens, seconds = timed(step)
        return tokens / seconds

    return [("loader, packed, DP=1 (tokens/s per rank)", rate()),
            ("loader, packed, rank 0 of DP=4 (tokens/s)", rate(dp_rank=0, dp_size=4)),
            ("loader, batch-uniform, DP=1 (tokens/s)", rate(mode="batch_uniform")),
            ("loader + [b,1,s,s] attention mask on CPU (tokens/s)", rate(build_mask=True))]


def tagging_rows(shards: Path, workdir: Path) -> list[tuple[str, float]]:
    docs = [d for s in Manifest.read(shards).shards[:2] for d in read_shard(shards / s.name)]
    sample = docs[:2000]
    model = LinearClassifier.train([d.meta["text"] for d in sample],
                                   [int(d.meta["category"] == "spanish") for d in sample])
    model.save(workdir / "classifier.npz")
    texts = [d.meta["text"] for d in docs]

    def score() -> int:
        for i in range(0, len(texts), 256):
            model.score([], texts[i:i + 256])
        return len(texts)

    count, seconds = timed(score)
    rows = [("linear classifier scoring only (docs/s per core)", count / seconds)]
    spec = ClassifierSpec("linear", str(workdir / "classifier.npz"))
    for workers in (1, 2):
        out = workdir / f"tagged-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        cpu, wall = cpu_seconds(), time.perf_counter()
        num_docs = tag_shards(shards, out, spec, workers=workers).num_docs
        cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
        rows += [(f"tag end to end, {workers} worker(s) (docs/s per core)", num_docs / cpu),
                 (f"tag end to end, {workers} worker(s) (docs/s wall clock)", num_docs / wall)]
    return rows


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
    print(f"corpus: {corpus.num_docs} docs, {int(corpus.offsets[-1]):,} tokens; {os.cpu_count()} CPU cores; "
          f"seq_length {args.seq_length}, micro-batch {args.micro_batch_size}")
    rows = loader_rows(corpus, args) + tagging_rows(shards, workdir)
    print("\n| measurement | rate |\n|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
