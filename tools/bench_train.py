"""End-to-end training throughput: SGTM against no masking, through the real trainer, per engine.

    python tools/bench_train.py [--hidden 256] [--layers 4] [--heads 4] [--seq 256] [--micro-batch 4]
        [--global-batch 8] [--steps 30] [--warmup 5] [--nproc 1] [--engines megatron,deepspeed]
        [--zero-stage 1] [--repeats 1] [--json PATH]

What it measures: for each engine (``megatron``, and ``deepspeed`` at ZeRO stage ``--zero-stage``)
and each method (``sgtm``: the SGTM layers with step gating; ``none``: the same model and data with
the ``none`` strategy), one full training job of ``megatron_sgtm.training.loop.train`` (config from
``megatron_sgtm.training.config.from_dict``): data loading, labelling, the sampler, forward +
backward + the engine's optimizer step, logging, and the final evaluation. Each job runs in its
own process tree (``torch.distributed.run --standalone --nproc-per-node=N``), so one process runs one
training job and no state leaks between them. The data is a synthetic shard directory (default
2000 documents, a ~500-token BPE vocabulary, ground-truth labels: ``score_source: truth``) built once
into a temporary directory and shared by all jobs.

Reported per job:

- tokens/s: the median of the trainer's per-step ``tokens_per_s`` (``metrics.jsonl``, records of
  kind ``train``), leaving out the first ``--warmup`` steps; plus the job's wall time
  (``summary.json``'s ``time_s``, which includes the final evaluation).
- MFU: tokens/s x the trainer's FLOPs per token (``logging.model_flops_per_token``) / (the GPU's dense
  bf16 peak x world size), only where ``logging.peak_tflops`` knows the GPU; otherwise ``n/a``.
- peak memory: the peak RSS of the job's whole process tree (launcher + ranks, RSS summed, sampled
  with psutil every ~50 ms); on a GPU also ``torch.cuda.max_memory_allocated`` (max over ranks).

and per engine the SGTM/none tokens/s ratio. With ``--repeats N`` each engine runs N rounds of the two
jobs, in alternating order (sgtm, none; none, sgtm; ...) so that background load drifts hit both alike;
the ratio is then the median of the rounds' ratios, with their range as the noise. Progress goes to
stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")  # megatron's import-time notices

METHODS = ("sgtm", "none")


def progress(text: str) -> None:
    print(f"[bench_train] {text}", file=sys.stderr, flush=True)


def build_data(out: Path, num_docs: int, vocab: int, seed: int = 0) -> int:
    """A synthetic shard directory (as tests/train_fixtures.build_tiny_shards); returns its vocab size."""
    from megatron_sgtm.data.build import build_shards
    from megatron_sgtm.data.synthetic import generate
    from megatron_sgtm.data.tokenizer import train_bpe

    if (out / "manifest.json").is_file():  # a --keep directory from an earlier run
        return json.loads((out / "manifest.json").read_text())["vocab_size"]
    docs = list(generate(num_docs, seed=seed))
    tokenizer = train_bpe((d.text for d in docs), vocab)
    manifest = build_shards(docs, tokenizer, out)
    return manifest.vocab_size


def make_config(args: argparse.Namespace, data: Path, vocab_size: int, engine: str, method: str,
                run_dir: Path) -> dict:
    ffn = 4 * args.hidden
    return {
        "method": method,
        "model": {"arch": "gpt2", "num_layers": args.layers, "hidden_size": args.hidden,
                  "num_attention_heads": args.heads, "ffn_hidden_size": ffn,
                  "vocab_size": -(-vocab_size // 64) * 64, "seq_length": args.seq},
        "sgtm": {"forget_heads": max(1, args.heads // 32), "forget_mlp_units": max(1, ffn // 32)},
        "data": {"path": str(data), "score_source": "truth", "retain_rate": 0.25, "heldout_fraction": 0.05},
        "parallel": {"engine": engine, "zero_stage": args.zero_stage},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "global_batch_size": args.global_batch,
                  "micro_batch_size": args.micro_batch},
        "train": {"train_steps": args.steps, "log_interval": max(1, args.steps // 5), "eval_interval": 0,
                  "eval_batches": args.nproc, "bf16": args.bf16},
        "logging": {"run_dir": str(run_dir), "wandb_mode": "disabled"},
    }


class TreeSampler:
    """Peak summed RSS of a process and all its descendants, sampled on a thread."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_job(args: argparse.Namespace, cfg: dict, work: Path, name: str) -> dict:
    from megatron_sgtm.training.config import from_dict
    from megatron_sgtm.training.logging import model_flops_per_token, peak_tflops

    parsed = from_dict(json.loads(json.dumps(cfg)), name)  # fail here, not in the job, on a bad config
    cfg_path = work / f"{name}.json"  # JSON is YAML: the trainer's loader reads it
    cfg_path.write_text(json.dumps(cfg, indent=2))
    run_dir = Path(cfg["logging"]["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)  # the trainer appends to metrics.jsonl
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           str(Path(__file__).resolve()), "--worker", str(cfg_path)]
    log_path = work / f"{name}.log"
    progress(f"{name}: {' '.join(cmd[1:])} (log {log_path})")
    start = time.time()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = TreeSampler(proc.pid)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = -9
        peak_rss = sampler.stop()
    wall = time.time() - start
    result = {"name": name, "engine": cfg["parallel"]["engine"], "method": cfg["method"], "rc": rc,
              "wall_s": wall, "peak_rss_mib": peak_rss / 2**20}
    if rc != 0:
        tail = log_path.read_text()[-3000:]
        progress(f"{name}: FAILED (exit {rc}); log tail:\n{tail}")
        result["error"] = tail
        return result
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    measured = [r for r in train if r["step"] > args.warmup] or train
    tps = statistics.median(r["tokens_per_s"] for r in measured)
    summary = json.loads((run_dir / "summary.json").read_text())
    flops = model_flops_per_token(parsed)
    peak = peak_tflops()
    mfu = tps * flops / (peak * 1e12 * args.nproc) if peak else None
    cuda = [json.loads(p.read_text())["max_memory_allocated"] for p in sorted(run_dir.glob("cuda_mem_rank*.json"))]
    result.update(
        tokens_per_s=tps, tokens_per_s_min=min(r["tokens_per_s"] for r in measured),
        tokens_per_s_max=max(r["tokens_per_s"] for r in measured), measured_steps=len(measured),
        mfu=mfu, flops_per_token=flops, job_time_s=summary.get("time_s"),
        final_loss=train[-1]["loss"] if train else None, gated=summary.get("gated"),
        cuda_max_allocated_mib=max(cuda) / 2**20 if cuda else None,
    )
    progress(f"{name}: {tps:,.0f} tok/s (median of {len(measured)} steps), peak RSS {result['peak_rss_mib']:,.0f} MiB, "
             f"wall {wall:.0f}s")
    return result


def worker(cfg_path: str) -> int:
    """One training job (one rank of it, under torchrun): the real trainer, plus CUDA peak memory."""
    import yaml

    from megatron_sgtm.training.config import from_dict
    from megatron_sgtm.training.loop import train

    cfg = from_dict(yaml.safe_load(Path(cfg_path).read_text()), cfg_path)
    train(cfg)
    import torch

    if torch.cuda.is_available():
        rank = int(os.environ.get("RANK", "0"))
        (Path(cfg.logging.run_dir) / f"cuda_mem_rank{rank}.json").write_text(
            json.dumps({"max_memory_allocated": torch.cuda.max_memory_allocated()}))
    return 0


def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def print_table(results: list[dict]) -> None:
    gpu = any(r.get("cuda_max_allocated_mib") is not None for r in results)
    header = ["engine", "method", "tokens/s", "MFU", "peak RSS MiB"] + (["CUDA max alloc MiB"] if gpu else [])
    rows = []
    for r in results:
        if r["rc"] != 0:
            rows.append([r["engine"], r["method"], f"FAILED (exit {r['rc']})", "", fmt(r["peak_rss_mib"], ",.0f")])
            continue
        row = [r["engine"], r["method"], fmt(r["tokens_per_s"], ",.0f"), fmt(r["mfu"], ".2%"),
               fmt(r["peak_rss_mib"], ",.0f")]
        if gpu:
            row.append(fmt(r["cuda_max_allocated_mib"], ",.0f"))
        rows.append(row)
    if any(r.get("round", 0) for r in results):
        header.insert(2, "round")
        for row, r in zip(rows, results):
            row.insert(2, str(r.get("round", 0)))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
    print()
    for engine, per_round in round_ratios(results).items():
        ratio = statistics.median(per_round) if per_round else None
        spread = f" (median of {len(per_round)} rounds, range {min(per_round):.3f}-{max(per_round):.3f})" \
            if len(per_round) > 1 else ""
        print(f"{engine}: SGTM/none tokens/s = {fmt(ratio, '.3f')}{spread}")


def round_ratios(results: list[dict]) -> dict[str, list[float]]:
    """Per engine, the SGTM/none tokens/s ratio of each round where both jobs ran."""
    out: dict[str, list[float]] = {}
    for engine in dict.fromkeys(r["engine"] for r in results):
        out[engine] = []
        for round_ in sorted({r.get("round", 0) for r in results}):
            by = {r["method"]: r.get("tokens_per_s") for r in results
                  if r["engine"] == engine and r.get("round", 0) == round_}
            if by.get("sgtm") and by.get("none"):
                out[engine].append(by["sgtm"] / by["none"])
    return out


def ratios(results: list[dict]) -> dict[str, float | None]:
    return {engine: statistics.median(per_round) if per_round else None
            for engine, per_round in round_ratios(results).items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the tokens/s median")
    p.add_argument("--nproc", type=int, default=1, help="ranks per job (torchrun --nproc-per-node)")
    p.add_argument("--engines", default="megatron,deepspeed")
    p.add_argument("--zero-stage", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("--bf16", action="store_true", help="train in bf16 (GPU)")
    p.add_argument("--docs", type=int, default=2000, help="synthetic documents in the shard directory")
    p.add_argument("--vocab", type=int, default=500, help="BPE vocabulary of the synthetic data")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per job before it is killed")
    p.add_argument("--repeats", type=int, default=1, help="rounds of (sgtm, none) per engine, order alternating")
    p.add_argument("--keep", help="keep the data, configs, logs and run directories here (default: a temp dir)")
    p.add_argument("--json", help="write all results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats} must be >= 1")
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or set(engines) - {"megatron", "deepspeed"}:
        p.error(f"--engines {args.engines!r}: expected a comma list of megatron, deepspeed")

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        data = work / "data"
        vocab_size = build_data(data, args.docs, args.vocab)
        progress(f"built {args.docs} synthetic docs (vocab {vocab_size}) into {data} in {time.time() - t0:.1f}s")
        results = []
        for engine in engines:
            for round_ in range(args.repeats):
                for method in METHODS if round_ % 2 == 0 else METHODS[::-1]:
                    name = f"{engine}-{method}" + (f"-r{round_}" if args.repeats > 1 else "")
                    cfg = make_config(args, data, vocab_size, engine, method, work / "runs" / name)
                    results.append({**run_job(args, cfg, work, name), "round": round_})

    print_table(results)
    if args.json:
        out = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "results": results,
               "sgtm_over_none": ratios(results),
               "sgtm_over_none_per_round": round_ratios(results), "cpu_count": os.cpu_count(),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
        Path(args.json).write_text(json.dumps(out, indent=2))
        progress(f"wrote {args.json}")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
