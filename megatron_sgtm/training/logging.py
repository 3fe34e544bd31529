"""Run logging: console progress, a metrics JSONL in the run directory, and wandb (offline by default).

The wandb run's id is stored with each checkpoint (``meta.json``), so a resumed job continues the same
wandb run (``resume="allow"``) from the step after its checkpoint. Steps the server already holds
(online: a job killed after its checkpoint had sent later steps) are not sent again, so the run's history
keeps one row per step. A SIGKILLed job loses what wandb had not written yet (offline, wandb-core
buffers its run file); metrics.jsonl is the complete record.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from megatron_sgtm.atomic import write_json
from megatron_sgtm.training.config import TrainConfig

METRICS = "metrics.jsonl"  # one JSON record per line: {"kind": "train" | "eval", "step": ..., values}

# Dense bf16 peak of known accelerators, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def model_flops_per_token(cfg: TrainConfig) -> float:
    """Training FLOPs per token: 6 x parameters in matmuls + attention scores (PaLM's estimate)."""
    m = cfg.model
    hd = m.hidden_size // m.num_attention_heads
    attn = m.hidden_size * hd * (m.num_attention_heads * 2 + m.num_query_groups * 2)
    mlp = m.hidden_size * m.ffn_hidden_size * (3 if m.gated else 2)
    params = m.num_layers * (attn + mlp) + m.vocab_size * m.hidden_size
    return 6.0 * params + 12.0 * m.num_layers * m.hidden_size * m.seq_length


def peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class RunLogger:
    """Writes only on rank 0; other ranks keep the same interface and do nothing."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int):
        self.enabled = rank == 0
        self.cfg = cfg
        self.world_size = world_size
        self.run_dir = Path(cfg.logging.run_dir)
        self.flops_per_token = model_flops_per_token(cfg)
        self.peak = peak_tflops()
        self.start = time.time()
        self._last_time = time.time()
        self._last_cpu = time.process_time()
        self.wandb = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
        self.metrics = (self.run_dir / METRICS).open("a")

    @property
    def wandb_id(self) -> str | None:
        """The wandb run's id, for the checkpoint's meta.json; None without wandb and on ranks > 0."""
        return None if self.wandb is None else self.wandb.id

    def start_wandb(self, run_id: str | None = None) -> None:
        """Start (``run_id`` None) or continue (the id a checkpoint recorded) the wandb run of this job, unless
        ``logging.wandb_mode`` is disabled. Online mode reads the API key from WANDB_API_KEY (or `wandb login`);
        offline runs land in RUN_DIR/wandb for `wandb sync`."""
        if not self.enabled or self.cfg.logging.wandb_mode == "disabled":
            return
        import wandb

        c = self.cfg.logging
        self.wandb = wandb.init(project=c.wandb_project, entity=c.wandb_entity, group=c.wandb_group,
                                name=c.wandb_name, id=run_id, resume="allow" if run_id else None,
                                dir=str(self.run_dir), config=self.cfg.to_dict(), mode=c.wandb_mode)

    def rewind(self, step: int) -> None:
        """Drop the records a run starting at `step` will write again (those of later steps, the final
        evaluation that follows the last checkpoint, and a line torn by a crash), atomically: after any
        resume metrics.jsonl holds one record per step and kind."""
        if not self.enabled:
            return
        self.metrics.close()
        path = self.run_dir / METRICS
        redone_eval = step >= self.cfg.train.train_steps
        kept = [line for line in path.read_text().splitlines()
                if (r := _record(line)) is not None and (r["step"] < step or r["step"] == step and not (
                    r["kind"] == "eval" and redone_eval))]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        self.metrics = path.open("a")

    def console(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def record(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.metrics.flush()
        if self.wandb is not None and step >= self.wandb.starting_step:  # below: held by the resumed run
            self.wandb.log({f"{kind}/{k}": v for k, v in values.items() if isinstance(v, int | float)}, step=step)

    def train_step(self, step: int, total_steps: int, m: dict, gated: dict) -> None:
        now, cpu = time.time(), time.process_time()
        elapsed, self._last_time = now - self._last_time, now
        cpu_elapsed, self._last_cpu = cpu - self._last_cpu, cpu
        tps = m["tokens"] / elapsed if elapsed > 0 else 0.0
        u, r, f = m["label_counts"]
        total = max(u + r + f, 1.0)
        values = {
            "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"], "tokens_per_s": tps,
            # since the previous record: wall seconds, and this process's CPU seconds (all its threads), which other
            # processes on a shared machine do not inflate (tools/bench_train.py's CPU clock)
            "step_s": elapsed, "step_cpu_s": cpu_elapsed,
            "label_mix_U": u / total, "label_mix_R": r / total, "label_mix_F": f / total,
            "gated_retain_steps": gated["retain"], "gated_forget_steps": gated["forget"],
        }
        if self.peak:
            values["mfu"] = tps * self.flops_per_token / (self.peak * 1e12 * self.world_size)
        self.record("train", step, values)
        if step % self.cfg.train.log_interval == 0 or step == total_steps:
            done = step / total_steps
            eta = (time.time() - self.start) * (1 - done) / done if done > 0 else 0.0
            mfu = f" mfu {values['mfu']:.1%}" if "mfu" in values else ""
            self.console(
                f"step {step:6d}/{total_steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
                f"{tps:,.0f} tok/s{mfu} | U/R/F {u / total:.2f}/{r / total:.2f}/{f / total:.2f} | "
                f"gated R/F {gated['retain']}/{gated['forget']} | eta {eta:,.0f}s"
            )

    def evaluation(self, step: int, losses: dict) -> None:
        self.record("eval", step, losses)
        self.console(f"eval  {step:6d} | " + " | ".join(f"{k} {v:.4f}" for k, v in sorted(losses.items())))

    def summary(self, values: dict) -> None:
        """The run's final results: summary.json in the run directory and the wandb run's summary."""
        if not self.enabled:
            return
        (self.run_dir / "summary.json").write_text(json.dumps(values, indent=2))
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def status(self, values: dict) -> None:
        """status.json in the run directory, replaced atomically: ``running``, ``finished``, or ``stopped`` (on a
        signal, after saving) with the signal, the step and the checkpoint a restart continues from."""
        if self.enabled:
            write_json(self.run_dir / "status.json", {**values, "time": time.time()})

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            if self.wandb is not None:
                self.wandb.finish()


def _record(line: str) -> dict | None:
    """A complete metrics record, or None (a line torn by a crash)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None
