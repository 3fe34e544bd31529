"""End-to-end training throughput: SGTM against no masking, through the real trainer, per engine.

    python tools/bench_train.py [--hidden 256] [--layers 4] [--heads 4] [--seq 256] [--micro-batch 4]
        [--global-batch 8] [--steps 20] [--warmup 4] [--nproc 1] [--engines megatron,deepspeed]
        [--zero-stage 1] [--bf16] [--attention packed|dense|causal] [--repeats 5] [--clock cpu|wall]
        [--[no-]interleave] [--[no-]concurrent] [--json PATH]

What it measures: for each engine (``megatron``, and ``deepspeed`` at ZeRO stage ``--zero-stage``)
and each method (``sgtm``: the SGTM layers with step gating; ``none``: the same model and data with
the ``none`` strategy), training steps of the real engines on the same data, in one of two modes.

``--interleave`` (the default with the CPU clock): each round is one job whose process builds both methods'
engines with the trainer's own functions (``loop.make_engine``, ``run_data.load_data``,
``training_sampler``; the same seed) and steps them in turn (sgtm then none on odd steps, the reverse on even
ones; the first method alternates between rounds), timing each step around ``next(sampler)`` and
``engine.train_step`` on the wall and process-CPU clocks. A slow moment of the machine so lands on both
methods' neighbouring steps: on the 2-vCPU development machine whole jobs' rates moved by 2-25% between
rounds, interleaved steps' ratio by ±1-2%.

``--no-interleave``: one full training job per method of ``megatron_sgtm.training.loop.train`` (config from
``megatron_sgtm.training.config.from_dict``): data loading, labelling, the sampler, forward +
backward + the engine's optimizer step, logging, and the final evaluation. Each job runs in its
own process tree (``torch.distributed.run --standalone --nproc-per-node=N``), so one process runs one
training job and no state leaks between them. The data is a synthetic shard directory (default
2000 documents, a ~500-token BPE vocabulary, ground-truth labels: ``score_source: truth``) built once
into a temporary directory and shared by all jobs.

Reported per job (interleaved: per method, from the step times; no final evaluation, one shared RSS):

- tokens/s (wall): the median of the trainer's per-step ``tokens_per_s`` (``metrics.jsonl``, records of
  kind ``train``), leaving out the first ``--warmup`` steps; plus the job's wall time
  (``summary.json``'s ``time_s``, which includes the final evaluation).
- CPU tokens/s: the median over the same steps of a step's tokens over the CPU seconds rank 0's process spent
  on it (``step_cpu_s``, all its threads). Both methods train on the same batches in the same order, so
  the two medians are over the same steps' work. Other processes on a shared machine stretch a step's wall
  time many times more than its CPU time (at load 50-90: wall 10-30x, CPU seconds +10-60%).
  It is the default clock of the ratio on CPU (``--clock cpu``), where each rank then runs one thread
  unless ``OMP_NUM_THREADS`` is set (idle OpenMP threads spin, and spinning counts as CPU time); on a GPU
  the CPU only launches kernels, so the default there is ``--clock wall``.
- MFU: tokens/s x the trainer's FLOPs per token (``logging.model_flops_per_token``) / (the GPU's dense
  bf16 peak x world size), only where ``logging.peak_tflops`` knows the GPU; otherwise ``n/a``.
- peak memory: the peak RSS of the job's whole process tree (launcher + ranks, RSS summed, sampled
  with psutil every ~50 ms); on a GPU also ``torch.cuda.max_memory_allocated`` (max over ranks).

and per engine the SGTM/none ratio of tokens/s on both clocks, the ``--clock`` one first. Each engine runs
``--repeats`` rounds; without ``--interleave``, rounds of the two jobs: with ``--concurrent`` both at the
same time, each on its own core of an idle machine, so that whatever else runs slows both alike (a
process's CPU seconds still grow under contention, through cold caches: by up to ~20% at load 30-50);
else one after the other, in alternating order (sgtm, none; none, sgtm; ...) so that drifts hit both
alike. The ratio is the median of the rounds' ratios, and its spread the largest distance of a round's
ratio from that median, in percent of it. A second figure takes each measured step's fastest round for
each method (contention only ever slows a step down). Progress goes to stderr, the table to stdout. Both methods run
the same optimizer implementation (`SGTMAdamW`: ZeroSGTMAdamW under DeepSpeed) with the same
partitioning; only `sgtm` gives it region codes.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")  # megatron's import-time notices

METHODS = ("sgtm", "none")
# --attention: the trainer's document attention (packed THD, or a dense [b, 1, s, s] mask), or plain causal
# attention over the whole packed row (what bench_sgtm_overhead.py measures; no document boundaries).
ATTENTION = {"packed": {"attention": "packed"}, "dense": {"attention": "dense"},
             "causal": {"document_attention": False}}


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
        "data": {"path": str(data), "score_source": "truth", "retain_rate": 0.25, "heldout_fraction": 0.05,
                 **ATTENTION[args.attention]},
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


def launch(args: argparse.Namespace, work: Path, name: str, worker_args: list[str]) -> dict:
    """This script as a torchrun job of --nproc ranks with `worker_args`; its exit status, wall time, the peak
    RSS of its process tree, and the log's tail if it failed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           str(Path(__file__).resolve()), *worker_args]
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
    result = {"rc": rc, "wall_s": time.time() - start, "peak_rss_mib": peak_rss / 2**20,
              "loadavg_1m_after": os.getloadavg()[0]}
    if rc != 0:
        tail = log_path.read_text()[-3000:]
        progress(f"{name}: FAILED (exit {rc}); log tail:\n{tail}")
        result["error"] = tail
    return result


def step_figures(args: argparse.Namespace, steps: dict[int, dict]) -> dict:
    """tokens/s on both clocks (medians over the steps after --warmup) and the per-step figures."""
    measured = {k: v for k, v in steps.items() if k > args.warmup} or steps
    rates = [v["tokens"] / v["step_s"] for v in measured.values()]
    return {"tokens_per_s": statistics.median(rates),
            "cpu_tokens_per_s": statistics.median(v["tokens"] / v["step_cpu_s"] for v in measured.values()),
            "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates), "measured_steps": len(measured),
            "steps": measured}


def mfu(args: argparse.Namespace, cfg: dict, tokens_per_s: float) -> tuple[float | None, float]:
    """(MFU or None where the GPU's peak is unknown, the trainer's FLOPs per token)."""
    from megatron_sgtm.training.config import from_dict
    from megatron_sgtm.training.logging import model_flops_per_token, peak_tflops

    flops = model_flops_per_token(from_dict(json.loads(json.dumps(cfg))))
    peak = peak_tflops()
    return (tokens_per_s * flops / (peak * 1e12 * args.nproc) if peak else None), flops


def write_config(cfg: dict, work: Path, name: str) -> Path:
    from megatron_sgtm.training.config import from_dict

    from_dict(json.loads(json.dumps(cfg)), name)  # fail here, not in the job, on a bad config
    cfg_path = work / f"{name}.json"  # JSON is YAML: the trainer's loader reads it
    cfg_path.write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(cfg["logging"]["run_dir"], ignore_errors=True)  # the trainer appends to metrics.jsonl
    return cfg_path


def run_interleaved(args: argparse.Namespace, cfgs: list[dict], work: Path, name: str) -> list[dict]:
    """One ``--interleave`` round: both methods in one job, stepping in turn; a result per method."""
    paths = [write_config(cfg, work, f"{name}-{cfg['method']}") for cfg in cfgs]
    out = work / f"{name}.steps.json"
    job = launch(args, work, name, ["--interleave-worker", str(out), *map(str, paths)])
    results = []
    for cfg in cfgs:
        result = {"name": f"{name}-{cfg['method']}", "engine": cfg["parallel"]["engine"], "method": cfg["method"],
                  **job}
        if job["rc"] == 0:
            record = json.loads(out.read_text())
            steps = {int(k): v for k, v in record["steps"][cfg["method"]].items()}
            result.update(step_figures(args, steps), final_loss=steps[max(steps)]["loss"])
            result["mfu"], result["flops_per_token"] = mfu(args, cfg, result["tokens_per_s"])
            cuda = record["max_memory_allocated"]
            result["cuda_max_allocated_mib"] = cuda / 2**20 if cuda is not None else None
        results.append(result)
    figures = ", ".join(f"{r['method']} {fmt(r.get('cpu_tokens_per_s'), ',.0f')}" for r in results)
    progress(f"{name}: tok per CPU s {figures}; peak RSS {job['peak_rss_mib']:,.0f} MiB (both), load "
             f"{job['loadavg_1m_after']:.1f}")
    return results


def run_job(args: argparse.Namespace, cfg: dict, work: Path, name: str) -> dict:
    cfg_path = write_config(cfg, work, name)
    run_dir = Path(cfg["logging"]["run_dir"])
    result = {"name": name, "engine": cfg["parallel"]["engine"], "method": cfg["method"],
              **launch(args, work, name, ["--worker", str(cfg_path)])}
    if result["rc"] != 0:
        return result
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    steps = {r["step"]: {"tokens": r["tokens_per_s"] * r["step_s"], "step_s": r["step_s"],
                         "step_cpu_s": r["step_cpu_s"]} for r in train}
    summary = json.loads((run_dir / "summary.json").read_text())
    cuda = [json.loads(p.read_text())["max_memory_allocated"] for p in sorted(run_dir.glob("cuda_mem_rank*.json"))]
    result.update(step_figures(args, steps), job_time_s=summary.get("time_s"),
                  final_loss=train[-1]["loss"] if train else None, gated=summary.get("gated"),
                  cuda_max_allocated_mib=max(cuda) / 2**20 if cuda else None)
    result["mfu"], result["flops_per_token"] = mfu(args, cfg, result["tokens_per_s"])
    progress(f"{name}: {result['tokens_per_s']:,.0f} tok/s (median of {result['measured_steps']} steps), "
             f"{result['cpu_tokens_per_s']:,.0f} tok per CPU s, peak RSS {result['peak_rss_mib']:,.0f} MiB, "
             f"wall {result['wall_s']:.0f}s, load {result['loadavg_1m_after']:.1f}")
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


def interleaved_worker(cfg_paths: list[str], out: str) -> int:
    """One round of ``--interleave`` (one rank of it): both methods' engines built by the trainer's own functions
    in this process, stepping in turn (sgtm, none; none, sgtm; ...) on the batches of their own samplers. Each
    step is timed around `next(sampler)` and `engine.train_step`, on the wall clock and this process's CPU clock,
    so a slow moment of the machine lands on both methods' neighbouring steps instead of on one job."""
    import torch
    import yaml

    from megatron_sgtm.training.config import from_dict, validate
    from megatron_sgtm.training.distributed import init_distributed, world_size_from_env
    from megatron_sgtm.training.loop import make_engine
    from megatron_sgtm.training.run_data import load_data, training_sampler

    cfgs = [from_dict(yaml.safe_load(Path(path).read_text()), path) for path in cfg_paths]
    for cfg in cfgs:
        validate(cfg, world_size_from_env())
    rank, _, on_gpu = init_distributed()
    runs = []
    for cfg in cfgs:
        torch.manual_seed(cfg.train.seed)  # as `train` does: each method starts from the same weights as its job
        engine = make_engine(cfg, on_gpu)
        runs.append((cfg, engine, training_sampler(cfg, load_data(cfg), engine.dp_rank, engine.dp_size)))
    steps: dict[str, dict[int, dict]] = {cfg.method: {} for cfg in cfgs}
    for step in range(1, cfgs[0].train.train_steps + 1):
        for cfg, engine, sampler in runs if step % 2 else runs[::-1]:
            if on_gpu:
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            metrics = engine.train_step([next(sampler) for _ in range(sampler.num_micro_batches)])
            if on_gpu:
                torch.cuda.synchronize()
            steps[cfg.method][step] = {"tokens": metrics["tokens"], "step_s": time.perf_counter() - wall,
                                       "step_cpu_s": time.process_time() - cpu, "loss": metrics["loss"]}
    if rank == 0:
        cuda = torch.cuda.max_memory_allocated() if on_gpu else None
        Path(out).write_text(json.dumps({"steps": steps, "max_memory_allocated": cuda}))
    for _, engine, _ in runs:
        engine.shutdown()
    return 0


def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


CLOCKS = {"cpu": "cpu_tokens_per_s", "wall": "tokens_per_s"}


def print_table(results: list[dict], clock: str) -> None:
    gpu = any(r.get("cuda_max_allocated_mib") is not None for r in results)
    header = ["engine", "method", "round", "tokens/s", "CPU tokens/s", "MFU", "peak RSS MiB"] + (
        ["CUDA max alloc MiB"] if gpu else [])
    rows = []
    for r in results:
        if r["rc"] != 0:
            rows.append([r["engine"], r["method"], str(r["round"]), f"FAILED (exit {r['rc']})", "", "",
                         fmt(r["peak_rss_mib"], ",.0f")])
            continue
        row = [r["engine"], r["method"], str(r["round"]), fmt(r["tokens_per_s"], ",.0f"),
               fmt(r["cpu_tokens_per_s"], ",.0f"), fmt(r["mfu"], ".2%"), fmt(r["peak_rss_mib"], ",.0f")]
        if gpu:
            row.append(fmt(r["cuda_max_allocated_mib"], ",.0f"))
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
    print()
    for engine in dict.fromkeys(r["engine"] for r in results):
        for name in (clock, *(c for c in CLOCKS if c != clock)):
            per_round = round_ratios(results, CLOCKS[name])[engine]
            figure = ratio_summary(per_round)
            rounds = ", ".join(f"{x:.3f}" for x in per_round)
            text = "n/a" if figure is None else (f"{figure['ratio']:.3f} +-{figure['spread_pct']:.1f}% "
                                                 f"(median of {len(per_round)} rounds: {rounds})")
            print(f"{engine}: SGTM/none {'CPU ' if name == 'cpu' else ''}tokens/s = {text}"
                  + ("" if name == clock else "  [not the --clock]"))
        best = best_of_rounds(results, clock).get(engine)
        print(f"{engine}: SGTM/none from each step's fastest round = {fmt(best, '.3f')}")


def round_ratios(results: list[dict], field: str = "cpu_tokens_per_s") -> dict[str, list[float]]:
    """Per engine, the SGTM/none ratio of `field` in each round where both jobs ran."""
    out: dict[str, list[float]] = {}
    for engine in dict.fromkeys(r["engine"] for r in results):
        out[engine] = []
        for round_ in sorted({r["round"] for r in results}):
            by = {r["method"]: r.get(field) for r in results if r["engine"] == engine and r["round"] == round_}
            if by.get("sgtm") and by.get("none"):
                out[engine].append(by["sgtm"] / by["none"])
    return out


def best_of_rounds(results: list[dict], clock: str) -> dict[str, float]:
    """Per engine, SGTM/none tokens/s from each measured step's fastest round: both methods train on the same
    steps, and contention only ever slows a step down, so the fastest of several rounds filters it out."""
    field = {"cpu": "step_cpu_s", "wall": "step_s"}[clock]
    out = {}
    for engine in dict.fromkeys(r["engine"] for r in results):
        fastest: dict[str, dict[int, float]] = {}
        for r in results:
            if r["engine"] == engine and r["rc"] == 0:
                own = fastest.setdefault(r["method"], {})
                for step, figures in r["steps"].items():
                    own[step] = min(own.get(step, float("inf")), figures[field])
        steps = sorted(set(fastest.get("sgtm", {})) & set(fastest.get("none", {})))
        if steps:
            out[engine] = sum(fastest["none"][s] for s in steps) / sum(fastest["sgtm"][s] for s in steps)
    return out


def ratio_summary(per_round: list[float]) -> dict | None:
    """The median of the rounds' ratios and its spread: the largest distance of a round from it, in %."""
    if not per_round:
        return None
    ratio = statistics.median(per_round)
    return {"ratio": ratio, "spread_pct": 100 * max(abs(x - ratio) for x in per_round) / ratio,
            "min": min(per_round), "max": max(per_round)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of the tokens/s figures")
    p.add_argument("--nproc", type=int, default=1, help="ranks per job (torchrun --nproc-per-node)")
    p.add_argument("--engines", default="megatron,deepspeed")
    p.add_argument("--zero-stage", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("--bf16", action="store_true", help="train in bf16 (GPU)")
    p.add_argument("--attention", choices=tuple(ATTENTION), default="packed",
                   help="document attention as packed THD (the default) or a dense mask, or plain causal")
    p.add_argument("--docs", type=int, default=2000, help="synthetic documents in the shard directory")
    p.add_argument("--vocab", type=int, default=500, help="BPE vocabulary of the synthetic data")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per job before it is killed")
    p.add_argument("--repeats", type=int, default=5,
                   help="rounds of (sgtm, none) per engine (one after the other: order alternating)")
    p.add_argument("--concurrent", action=argparse.BooleanOptionalAction, default=None,
                   help="run a round's sgtm and none jobs at the same time, so that load from other processes "
                        "hits both alike (default: with --clock cpu)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default=None,
                   help="the clock of the headline SGTM/none ratio: process CPU seconds (default without CUDA) or "
                        "wall seconds (default with CUDA)")
    p.add_argument("--keep", help="keep the data, configs, logs and run directories here (default: a temp dir)")
    p.add_argument("--json", help="write all results as JSON here")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="each round one job training both methods in turn, step by step (the default with the CPU "
                        "clock); --no-interleave: one whole training job per method and round")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--interleave-worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.interleave_worker:
        return interleaved_worker(args.interleave_worker[1:], args.interleave_worker[0])
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats} must be >= 1")
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or set(engines) - {"megatron", "deepspeed"}:
        p.error(f"--engines {args.engines!r}: expected a comma list of megatron, deepspeed")
    if args.clock is None:
        import torch

        args.clock = "wall" if torch.cuda.is_available() else "cpu"
    if args.clock == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # idle OpenMP threads spin, and spinning is CPU time
    if args.interleave is None:
        args.interleave = args.clock == "cpu"
    if args.concurrent is None:
        args.concurrent = args.clock == "cpu" and not args.interleave

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
                jobs = []
                for method in METHODS if round_ % 2 == 0 else METHODS[::-1]:
                    name = f"{engine}-{method}-r{round_}"
                    jobs.append((make_config(args, data, vocab_size, engine, method, work / "runs" / name), name))
                if args.interleave:
                    done = run_interleaved(args, [cfg for cfg, _ in jobs], work, f"{engine}-r{round_}")
                    results.extend({**result, "round": round_, "interleaved": True} for result in done)
                    continue
                with ThreadPoolExecutor(len(jobs) if args.concurrent else 1) as pool:
                    done = pool.map(lambda job: run_job(args, job[0], work, job[1]), jobs)
                    results.extend({**result, "round": round_, "concurrent": args.concurrent} for result in done)

    print_table(results, args.clock)
    if args.json:
        per_round = {name: round_ratios(results, field) for name, field in CLOCKS.items()}
        out = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "interleave_worker")},
               "results": results,
               "clock": args.clock,
               "sgtm_over_none": {e: (ratio_summary(x) or {}).get("ratio") for e, x in per_round[args.clock].items()},
               "sgtm_over_none_per_round": per_round[args.clock],
               "sgtm_over_none_spread_pct": {e: (ratio_summary(x) or {}).get("spread_pct")
                                             for e, x in per_round[args.clock].items()},
               "sgtm_over_none_best_of_rounds": best_of_rounds(results, args.clock),
               "sgtm_over_none_by_clock": {name: {e: ratio_summary(x) for e, x in ratios.items()}
                                           for name, ratios in per_round.items()},
               "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "loadavg": os.getloadavg()}
        Path(args.json).write_text(json.dumps(out, indent=2))
        progress(f"wrote {args.json}")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
