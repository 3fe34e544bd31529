"""SGTM overhead: the same training step with plain megatron-core layers and with the SGTM layers.

    python tools/bench_sgtm_overhead.py [--hidden 512] [--layers 8] [--heads 8] [--seq 512]
        [--micro-batch 4] [--steps 10] [--warmup 3] [--arch gpt2|llama] [--device auto|cpu|cuda]
        [--bf16] [--backend local|gpu] [--json PATH]

Builds two GPTModels of identical shape and initial weights in one process (TP=PP=DP=1): "plain",
megatron-core's own layers (``partition=None``, i.e. strategy none, no labels), and "sgtm", the SGTM
layer spec with the paper's default partition (strategy ``sgtm``). Each is wrapped in megatron DDP
with megatron's optimizer (AdamW: torch's, or the TE/apex fused one where installed). One step is
forward + backward through megatron's schedule + gradient finalisation + optimizer step. The SGTM
micro-batch carries mixed labels: one all-R sequence, one all-F, one all-U and one packed R/F/U
sequence (extra rows repeat the pattern), so the retain-forward rule, the masked wgrad of all four
linears and the masked bias gradients all run. The two variants alternate step by step (ABBA
order) so that thermal or background drift hits both alike; warmup steps are not measured.

Reported per variant: median step time, tokens/s, the resident training state (parameters, grad
buffers, optimizer state, counted from the tensors) and the peak extra memory of a step
(activations, transients), taken in one extra, untimed step per variant: on CUDA
``torch.cuda.max_memory_allocated`` above the allocation at step start; on CPU the peak process RSS
(psutil, sampled every ms) above the RSS at step start, after ``malloc_trim`` has returned the
allocator's free pages (an approximation: glibc may keep fragmented pages). Then the step-time
ratio SGTM / plain.
Step gating of the optimizer (frozen regions) is not part of this step: the trainer adds it.

Goals: ratio <= 1.05 on CPU at hidden 512 / 8 layers (the defaults); <= 1.02 on a GPU at ~1B
parameters in bf16 (e.g. ``--hidden 2048 --layers 16 --heads 16 --bf16``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_sgtm.compat.cpu import enable_cpu_execution  # noqa: E402

enable_cpu_execution()

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.distributed.finalize_model_grads import finalize_model_grads  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.module import Float16Module  # noqa: E402

from megatron_sgtm.core.labels import TokenLabel, token_labels  # noqa: E402
from megatron_sgtm.core.partition import SGTMConfig  # noqa: E402
from megatron_sgtm.model import ModelConfig, build_gpt_model, resolve_partition  # noqa: E402

UNLABELED, RETAIN, FORGET = TokenLabel

SEED = 1234


@dataclass
class Variant:
    """One model under test with its DDP wrapper, optimizer and measurements."""

    name: str
    ddp: DistributedDataParallel
    optimizer: object
    use_labels: bool
    state_bytes: int = 0
    peak_bytes: int = 0
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--steps", type=int, default=10, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps per variant")
    p.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--bf16", action="store_true", help="bf16 parameters and activations")
    p.add_argument("--backend", choices=("local", "gpu"), default=None,
                   help="layer backend; default: gpu when CUDA is present, else local")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def pick_device(args: argparse.Namespace) -> tuple[torch.device, str]:
    """(device, backend) from the options and what this machine has."""
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        sys.exit("--device cuda: CUDA is not available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and cuda) else "cpu")
    if device.type == "cpu" and cuda:
        sys.exit("--device cpu on a CUDA machine is not supported (the CPU shims are off when CUDA exists)")
    return device, args.backend or ("gpu" if cuda else "local")


def init_distributed(device: torch.device) -> None:
    """A one-process group and megatron's parallel state (TP=PP=DP=1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if device.type == "cuda":
        torch.cuda.set_device(0)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)


def tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def state_bytes(ddp: DistributedDataParallel, optimizer) -> int:
    """Parameters, DDP grad buffers and optimizer state (incl. fp32 main params under bf16)."""

    def tensors() -> Iterator[torch.Tensor]:
        yield from ddp.module.parameters()
        for buffer in ddp.buffers:
            yield buffer.grad_data
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            inner = opt.optimizer
            for group in inner.param_groups:
                yield from group["params"]
            for per_param in inner.state.values():
                yield from (v for v in per_param.values() if torch.is_tensor(v) and v.dim() > 0)

    return tensor_bytes(tensors())


def build_variant(name: str, model_cfg: ModelConfig, args: argparse.Namespace, device: torch.device,
                  backend: str) -> Variant:
    """The model (same seed, so same initial weights), DDP and optimizer of one variant."""
    on_gpu = device.type == "cuda"
    config = model_cfg.transformer_config(on_gpu=on_gpu, bf16=args.bf16)
    partition = resolve_partition(SGTMConfig(strategy="sgtm"), model_cfg, 1) if name == "sgtm" else None
    torch.manual_seed(SEED)
    model_parallel_cuda_manual_seed(SEED)
    gpt = build_gpt_model(model_cfg, config, partition, backend=backend)
    if on_gpu:
        gpt.cuda()
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
        module=Float16Module(config, gpt) if args.bf16 else gpt,  # as the megatron engine (and megatron's trainer)
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                        clip_grad=1.0, bf16=args.bf16, params_dtype=config.params_dtype),
        [ddp],
    )
    return Variant(name=name, ddp=ddp, optimizer=optimizer, use_labels=partition is not None)


def make_batch(model_cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tokens and mixed labels: rows all-R, all-F, all-U, packed R/F/U, then repeating."""
    b, s = args.micro_batch, args.seq
    gen = torch.Generator().manual_seed(SEED)
    thirds = torch.tensor([RETAIN, FORGET, UNLABELED]).repeat_interleave((s + 2) // 3)[:s]
    rows = [torch.full((s,), RETAIN), torch.full((s,), FORGET), torch.full((s,), UNLABELED), thirds]
    batch = {
        "tokens": torch.randint(0, model_cfg.vocab_size, (b, s), generator=gen),
        "targets": torch.randint(0, model_cfg.vocab_size, (b, s), generator=gen),
        "token_labels": torch.stack([rows[i % len(rows)] for i in range(b)]),
        "position_ids": torch.arange(s).expand(b, s).contiguous(),
    }
    return {k: v.to(device) for k, v in batch.items()}


@contextmanager
def peak_memory(device: torch.device) -> Iterator[list[int]]:
    """Yields a one-element list that holds, on exit, the peak extra bytes of the enclosed code."""
    result = [0]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result[0] = torch.cuda.max_memory_allocated() - start
        return
    process = psutil.Process()
    start = process.memory_info().rss
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result[0] = max(peak[0], process.memory_info().rss) - start


def train_step(variant: Variant, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[float, float]:
    """One forward/backward/optimizer step: (seconds, loss)."""
    losses: list[torch.Tensor] = []

    def forward_step(_data_iterator, model):
        with token_labels(batch["token_labels"] if variant.use_labels else None):
            out = model(batch["tokens"], batch["position_ids"], None, labels=batch["targets"])

        def loss_func(per_token: torch.Tensor):
            loss = per_token.float().mean()
            losses.append(loss.detach())
            return loss, {"loss": loss.detach()}

        return out, loss_func

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    variant.ddp.zero_grad_buffer()
    variant.optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=None,
        model=[variant.ddp],
        num_microbatches=1,
        seq_length=batch["tokens"].shape[1],
        micro_batch_size=batch["tokens"].shape[0],
        forward_only=False,
    )
    finalize_model_grads([variant.ddp])
    variant.optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, float(losses[0])


def release_free_memory() -> None:
    """Hand glibc's free heap pages back to the OS, so that RSS approximates live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_memory(variant: Variant, batch: dict[str, torch.Tensor], device: torch.device) -> None:
    """One extra, untimed step under the memory meter."""
    if device.type == "cpu":
        release_free_memory()
    with peak_memory(device) as peak:
        _, loss = train_step(variant, batch, device)
    variant.peak_bytes = peak[0]
    variant.losses.append(loss)
    print(f"[memory] {variant.name:5s} peak +{peak[0] / 2**20:.0f} MiB", file=sys.stderr, flush=True)


def run(variants: list[Variant], batch: dict[str, torch.Tensor], device: torch.device,
        warmup: int, steps: int) -> None:
    """Alternate the variants step by step (ABBA), recording measured steps after the warmup."""
    total = warmup + steps
    for i in range(total):
        order = variants if i % 2 == 0 else variants[::-1]
        for variant in order:
            seconds, loss = train_step(variant, batch, device)
            measured = i >= warmup
            if measured:
                variant.times.append(seconds)
            variant.losses.append(loss)
            tag = "" if measured else " (warmup)"
            print(f"[{i + 1}/{total}] {variant.name:5s} {seconds:8.3f} s  loss {loss:.4f}{tag}",
                  file=sys.stderr, flush=True)
        if i == 0:
            for variant in variants:  # optimizer state exists after the first step
                variant.state_bytes = state_bytes(variant.ddp, variant.optimizer)


def summarize(variants: list[Variant], tokens_per_step: int) -> dict[str, dict[str, float]]:
    figures = {}
    for v in variants:
        median = statistics.median(v.times)
        figures[v.name] = {
            "median_step_s": median,
            "min_step_s": min(v.times),
            "max_step_s": max(v.times),
            "tokens_per_s": tokens_per_step / median,
            "state_mib": v.state_bytes / 2**20,
            "peak_step_extra_mib": v.peak_bytes / 2**20,
            "final_loss": v.losses[-1],
        }
    return figures


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, backend = pick_device(args)
    init_distributed(device)
    model_cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                            vocab_size=args.vocab, seq_length=args.seq, arch=args.arch)
    variants = [build_variant(name, model_cfg, args, device, backend) for name in ("plain", "sgtm")]
    n_params = sum(p.numel() for p in variants[0].ddp.module.parameters())
    threads = torch.get_num_threads()
    print(f"{args.arch}: {n_params / 1e6:.1f}M params, hidden {args.hidden}, {args.layers} layers, "
          f"{args.heads} heads, seq {args.seq}, micro-batch {args.micro_batch}, vocab {args.vocab}; "
          f"device {device.type}, backend {backend}, {'bf16' if args.bf16 else 'fp32'}, torch threads {threads} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})", file=sys.stderr, flush=True)

    batch = make_batch(model_cfg, args, device)
    load_start = os.getloadavg()
    run(variants, batch, device, args.warmup, args.steps)
    for variant in variants:
        measure_memory(variant, batch, device)
    tokens_per_step = args.micro_batch * args.seq
    figures = summarize(variants, tokens_per_step)
    ratio = figures["sgtm"]["median_step_s"] / figures["plain"]["median_step_s"]
    min_ratio = figures["sgtm"]["min_step_s"] / figures["plain"]["min_step_s"]

    mem = "step peak MiB (CUDA alloc)" if device.type == "cuda" else "step peak MiB (RSS)"
    header = f"{'variant':8s} {'median s/step':>14s} {'min s/step':>11s} {'tokens/s':>10s} {'state MiB':>10s}"
    print(f"\n{header} {mem:>26s}")
    for name, f in figures.items():
        print(f"{name:8s} {f['median_step_s']:14.3f} {f['min_step_s']:11.3f} {f['tokens_per_s']:10.0f} "
              f"{f['state_mib']:10.0f} {f['peak_step_extra_mib']:26.0f}")
    print(f"step-time ratio sgtm/plain: {ratio:.3f} (median); {min_ratio:.3f} (fastest steps)")

    if args.json:
        record = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "device": device.type if device.type == "cpu" else torch.cuda.get_device_name(),
            "backend": backend,
            "params": n_params,
            "torch_threads": threads,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.__version__,
            "tokens_per_step": tokens_per_step,
            "variants": figures,
            "step_times_s": {v.name: v.times for v in variants},
            "ratio_sgtm_over_plain": ratio,
            "ratio_of_fastest_steps": min_ratio,
            "load_average_start_end": [load_start, os.getloadavg()],
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
