"""Data-path throughput: loader tokens/s per data-parallel rank, tagging documents/s, `data build` tokens
per CPU-second and its speed-up with workers, and the peak RSS of streaming builds.

    python tools/bench_data.py [--num-docs 40000] [--seq-length 2048] [--workdir DIR]
    python tools/bench_data.py --only build [--build-input corpus.jsonl] [--num-docs 40000]
    python tools/bench_data.py --only rss --rss-docs 20000 80000

Builds a synthetic corpus (generator + BPE + shards), then measures (1) the sampler producing packed
micro-batches with label tensors on one rank, in both modes and at DP=4, (2) the linear classifier
alone, (3) `tag_shards` end to end (verify and read shard, score, write tagged shard) with 1 and 2
worker processes and (4) `build_shards` from a JSONL file (synthetic, or --build-input, e.g. the man-page
corpus of tools/manpages_corpus.py) with 1 and 2 tokenizer workers. Rates are per CPU-second (the goals
are per core; shared machines are noisy), with wall-clock rates alongside; /proc/loadavg is printed
before and after. ``--only rss`` runs `megatron-sgtm data build --hf-dataset json --streaming` on
synthetic corpora of each --rss-docs size in a child process and prints its peak RSS. Run it from the
repository root (or install the package).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

from megatron_sgtm.data.build import build_shards
from megatron_sgtm.data.classifiers import LinearClassifier
from megatron_sgtm.data.corpus import load_corpus
from megatron_sgtm.data.shards import Manifest, read_shard
from megatron_sgtm.data.sources import read_documents
from megatron_sgtm.data.synthetic import generate, write_jsonl
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


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def build_rows(jsonl: Path, tokenizer, workdir: Path) -> list[tuple[str, float]]:
    """`build_shards` from a JSONL file at 1 and 2 workers: tokens per CPU-second, wall-clock speed-up. The
    one-off import of webdataset (it imports torch, ~1 s of CPU) happens before the clock starts."""
    import webdataset  # noqa: F401

    rows, walls = [], {}
    for workers in (1, 2):
        out = workdir / f"built-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"[bench] build, {workers} worker(s); loadavg before: {loadavg()}", flush=True)
        cpu, wall = cpu_seconds(), time.perf_counter()
        tokens = build_shards(read_documents([jsonl]), tokenizer, out, docs_per_shard=5000, workers=workers).num_tokens
        cpu, walls[workers] = cpu_seconds() - cpu, time.perf_counter() - wall
        print(f"[bench] loadavg after: {loadavg()}", flush=True)
        rows += [(f"build, {workers} worker(s) (tokens per CPU-second)", tokens / cpu),
                 (f"build, {workers} worker(s) (tokens/s wall clock)", tokens / walls[workers])]
    return [*rows, ("build wall-clock speed-up, 2 workers over 1 (x100)", 100 * walls[1] / walls[2])]


def rss_rows(sizes: list[int], tokenizer, workdir: Path) -> list[tuple[str, float]]:
    """Peak RSS (MiB) of a streaming `data build` child process per corpus size."""
    tokenizer_path = workdir / "rss-tokenizer.json"
    tokenizer.save(str(tokenizer_path))
    rows = []
    for num_docs in sizes:
        raw = workdir / f"rss-{num_docs}"
        if not (raw / "part-0.jsonl").exists():
            raw.mkdir(parents=True, exist_ok=True)
            with open(raw / "part-0.jsonl", "w") as f:
                write_jsonl(f, generate(num_docs, seed=1))
        out = workdir / f"rss-built-{num_docs}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "megatron_sgtm.cli", "data", "build", "--hf-dataset", "json", "--streaming",
               "--hf-data-files", str(raw / "part-0.jsonl"), "--tokenizer", str(tokenizer_path), "--out", str(out)]
        print(f"[bench] {' '.join(cmd)}; loadavg before: {loadavg()}", flush=True)
        child = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"build of {num_docs} docs failed"
        tokens = Manifest.read(out).num_tokens
        size = (raw / "part-0.jsonl").stat().st_size
        print(f"[bench] loadavg after: {loadavg()}", flush=True)
        rows.append((f"streaming build of {num_docs} docs ({size / 2**20:,.0f} MiB JSONL, {tokens:,} tokens): "
                     "peak RSS (MiB)", usage.ru_maxrss / 1024))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-docs", type=int, default=40_000)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the built shards here")
    parser.add_argument("--only", choices=("loader", "tagging", "build", "rss"), help="one measurement only")
    parser.add_argument("--build-input", type=Path, help="build: a JSONL corpus (default: --num-docs synthetic)")
    parser.add_argument("--rss-docs", type=int, nargs="+", default=[20_000, 80_000],
                        help="rss: corpus sizes in documents")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    workdir.mkdir(parents=True, exist_ok=True)
    texts = ((d.text for d in read_documents([args.build_input])) if args.build_input and args.only == "build"
             else (d.text for d in generate(5000, seed=0)))
    tokenizer = train_bpe(islice(texts, 5000), args.vocab_size)
    print(f"{os.cpu_count()} CPU cores; loadavg {loadavg()}")
    rows = []
    if args.only in (None, "build"):
        jsonl = args.build_input or workdir / "build-input.jsonl"
        if not jsonl.exists():
            with open(jsonl, "w") as f:
                write_jsonl(f, generate(args.num_docs, seed=0))
        rows += build_rows(jsonl, tokenizer, workdir)
    if args.only == "rss":
        rows += rss_rows(args.rss_docs, tokenizer, workdir)
    if args.only in (None, "loader", "tagging"):
        shards = workdir / "shards"
        if not (shards / "manifest.json").exists():
            build_shards(generate(args.num_docs, seed=0), tokenizer, shards, docs_per_shard=5000)
        corpus = load_corpus(shards)
        print(f"corpus: {corpus.num_docs} docs, {int(corpus.offsets[-1]):,} tokens; "
              f"seq_length {args.seq_length}, micro-batch {args.micro_batch_size}")
        rows += loader_rows(corpus, args) if args.only != "tagging" else []
        rows += tagging_rows(shards, workdir) if args.only != "loader" else []
    print("\n| measurement | rate |\n|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
