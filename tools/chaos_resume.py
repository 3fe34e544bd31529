"""Fault injection: SIGKILL a training job at random moments (some of them inside a checkpoint save), resume it
with ``checkpoint.resume=auto``, and compare every step's loss and the final evaluation with an uninterrupted run.

    python tools/chaos_resume.py --trials 20 --out runs/chaos            # megatron engine, 2 ranks
    python tools/chaos_resume.py --trials 5 --engine deepspeed --zero-stage 3

Each trial: start the job; SIGKILL the launcher and every rank (no chance to clean up) a random fraction of a
step after a randomly drawn step was logged (the last step included: the kill then lands in the final save or
evaluation), or, every third trial, the moment the next checkpoint's ``.partial`` directory appears; then run the same
command again until it finishes. A trial passes when every step either job logged has exactly the uninterrupted
run's loss and the final per-category evaluation is identical. Prints one line per trial and the tally.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def tiny_data(out: Path) -> Path:
    """The embedded synthetic corpus at a test-sized scale (built once, reused by every trial)."""
    if (out / "manifest.json").is_file():
        return out
    from megatron_sgtm.data.build import build_shards
    from megatron_sgtm.data.synthetic import generate
    from megatron_sgtm.data.tokenizer import train_bpe

    docs = list(generate(400, seed=0))
    build_shards(docs, train_bpe((d.text for d in docs), 300), out)
    return out


def config(args: argparse.Namespace, data: Path, run_dir: Path, ckpt: Path | None) -> dict:
    cfg = {
        "method": "sgtm",
        "model": {"arch": "gpt2", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                  "ffn_hidden_size": 64, "vocab_size": 320, "seq_length": 32},
        "sgtm": {"forget_heads": 1, "forget_mlp_units": 8},
        "data": {"path": str(data), "score_source": "truth", "retain_rate": 0.5, "heldout_fraction": 0.1},
        "parallel": {"engine": args.engine, "zero_stage": args.zero_stage},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "global_batch_size": 8, "micro_batch_size": 2},
        "train": {"train_steps": args.steps, "log_interval": 1, "eval_interval": 0, "eval_batches": 2},
        "logging": {"run_dir": str(run_dir), "wandb_mode": "disabled"},
    }
    if ckpt is not None:
        cfg["checkpoint"] = {"dir": str(ckpt), "save_interval": args.save_interval, "keep_last": 2, "resume": "auto"}
    return cfg


def command(args: argparse.Namespace, cfg: dict, path: Path) -> list[str]:
    path.write_text(json.dumps(cfg))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
            "-m", "megatron_sgtm.cli", "train", "--config", str(path)]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of the complete train records (a killed job may leave a torn last line)."""
    records = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "train":
            records[record["step"]] = record["loss"]
    return records


def evaluation(run_dir: Path) -> dict[str, float]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k.endswith(("_loss", "_ablated", "_calibrated"))}


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank (torchrun starts its workers in sessions of their own)."""
    try:
        victims = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        victims = []
    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def run(cmd: list[str], env: dict, log: Path) -> float:
    start = time.time()
    with log.open("w") as out:
        subprocess.run(cmd, env=env, check=True, stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    return time.time() - start


def trial(args, index: int, env: dict, data: Path, step_time: float, reference: tuple) -> tuple[bool, str]:
    rng = random.Random(args.seed * 1000 + index)
    work = args.out / f"trial_{index:03d}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt = work / "ckpt"
    during_save = index % 3 == 2
    # Kill a random fraction of a step after this step is logged, or inside the first save that starts after it.
    target_step = rng.randint(1, args.steps - 1 if during_save else args.steps)
    delay = rng.uniform(0.0, step_time)
    cmd = command(args, config(args, data, work / "killed", ckpt), work / "killed.yaml")
    with (work / "killed.log").open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        start, logged_at = time.time(), None
        while proc.poll() is None:
            if logged_at is None and target_step in train_losses(work / "killed"):
                logged_at = time.time()
            if during_save:  # the first save to start after the drawn step
                saving = ckpt.is_dir() and any(p.name.endswith(".partial") for p in ckpt.iterdir())
                if logged_at is not None and saving:
                    break
            elif logged_at is not None and time.time() - logged_at >= delay:
                break
            time.sleep(0.01)
        killed_after = time.time() - start
        finished = proc.poll() is not None
        kill_tree(proc)
    reached = max(train_losses(work / "killed"), default=0)
    where = "finished before the kill" if finished else (
        f"killed {'inside a save' if during_save else 'at random'} after {killed_after:.1f}s (step {reached} logged)")
    run(command(args, config(args, data, work / "resumed", ckpt), work / "resumed.yaml"), env, work / "resumed.log")
    expected_losses, expected_eval = reference
    before, after = train_losses(work / "killed"), train_losses(work / "resumed")
    logged = [*before.items(), *after.items()]
    wrong = [step for step, loss in logged if loss != expected_losses.get(step)]
    complete = max(after, default=reached) == args.steps
    same_eval = evaluation(work / "resumed") == expected_eval
    ok = complete and not wrong and same_eval
    resumed = f"resumed {min(after)}..{max(after)}" if after else "resumed at the final step"
    detail = (f"{where}; {resumed}: {len(logged) - len(wrong)}/{len(logged)} logged step losses identical, final "
              f"evaluation {'identical' if same_eval else 'DIFFERENT'}{'' if complete else ', did not finish'}")
    return ok, detail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=12, help="train.train_steps of every job")
    parser.add_argument("--save-interval", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2, help="ranks per job (data parallel)")
    parser.add_argument("--engine", choices=("megatron", "deepspeed"), default="megatron")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/chaos"))
    args = parser.parse_args()
    if args.trials < 1 or args.steps < 2 or args.save_interval < 1:
        parser.error("--trials >= 1, --steps >= 2 and --save-interval >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    data = tiny_data(args.out / "data")

    print(f"uninterrupted run ({args.engine}, {args.nproc} ranks, {args.steps} steps) ...", flush=True)
    ref_dir = args.out / "uninterrupted"
    ckpt = args.out / "uninterrupted_ckpt"  # saves as the trials do, so their timing matches
    shutil.rmtree(ref_dir, ignore_errors=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    cmd = command(args, config(args, data, ref_dir, ckpt), args.out / "uninterrupted.yaml")
    start = time.time()
    with (args.out / "uninterrupted.log").open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        first_step = last_step = None
        while proc.poll() is None:
            steps = train_losses(ref_dir)
            if first_step is None and steps:
                first_step = time.time() - start
            if last_step is None and len(steps) == args.steps:
                last_step = time.time() - start
            time.sleep(0.05)
    if proc.returncode != 0:
        print(f"the uninterrupted run failed (exit {proc.returncode}); see {args.out / 'uninterrupted.log'}")
        return 1
    total = time.time() - start
    reference = (train_losses(ref_dir), evaluation(ref_dir))
    step_time = ((last_step or total) - (first_step or 0.0)) / max(args.steps - 1, 1)
    print(f"  {total:.1f}s, {step_time:.2f}s per step", flush=True)

    passed = 0
    for index in range(args.trials):
        ok, detail = trial(args, index, env, data, step_time, reference)
        passed += ok
        print(f"trial {index + 1}/{args.trials}: {'identical' if ok else 'MISMATCH'} ({detail})", flush=True)
    print(f"{passed}/{args.trials} trials resumed to the uninterrupted run's losses and evaluation")
    return 0 if passed == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
