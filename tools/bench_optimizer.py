"""Step-gated optimizer cost: `SGTMAdamW` against torch's AdamW (foreach and fused) on a GPT layer stack's parameters.

    python tools/bench_optimizer.py [--hidden 512] [--layers 12] [--heads 8] [--vocab 8192] [--flat]
        [--steps 10] [--warmup 2] [--device auto|cpu|cuda] [--json PATH]

Builds the SGTM GPTModel (paper partition, strategy ``sgtm``, TP=PP=DP=1) and takes its parameters'
region maps (`regions.param_regions` -> `gating.region_codes`), as the megatron engine's
DistributedOptimizer shards do at DP=1 (one tensor per parameter); ``--flat`` instead lays every
parameter out in one flat buffer, as a ZeRO-1/2 partition does. Fixed random gradients; fp32.
Variants, timed in alternation (so background load hits all alike), median ms per step (on CPU the
process's CPU time, which other processes on a shared machine disturb far less than wall time; on a GPU
wall time between synchronisations):

- ``torch``: ``torch.optim.AdamW(foreach=True)`` on a copy of the same tensors;
- ``torch fused``: ``torch.optim.AdamW(fused=True)`` (on CPU too: torch >= 2.4), the fastest plain step torch has;
- ``ungated (fresh)``: SGTMAdamW before any gated step (every region at the same step count);
- ``ungated``: SGTMAdamW after gated steps (regions at different step counts: per-region views);
- ``gated retain`` / ``gated forget``: a step that freezes Θ_R / Θ_F.

Goals: ungated / torch <= 1.10, gated / torch <= 1.15 (the ``vs torch`` column); ``vs fused`` compares with
torch's fused AdamW (SGTMAdamW's own dense steps are fused: `gating.FUSED_ADAMW_DEVICES`).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_sgtm.compat.cpu import enable_cpu_execution  # noqa: E402

enable_cpu_execution()

from megatron.core import parallel_state as ps  # noqa: E402

from megatron_sgtm.core.gating import Gate, SGTMAdamW, region_codes  # noqa: E402
from megatron_sgtm.core.partition import SGTMConfig  # noqa: E402
from megatron_sgtm.core.regions import param_regions  # noqa: E402
from megatron_sgtm.core.strategy import Region  # noqa: E402
from megatron_sgtm.model import ModelConfig, build_gpt_model, resolve_partition  # noqa: E402

HYPER = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--flat", action="store_true", help="one flat buffer (a ZeRO-1/2 partition at DP=1)")
    p.add_argument("--steps", type=int, default=10, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured rounds")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args(argv)


def model_tensors(args: argparse.Namespace, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(fp32 parameter, its region codes or None) of the SGTM model, per parameter or as one flat buffer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                      vocab_size=args.vocab, seq_length=256)
    partition = resolve_partition(SGTMConfig(strategy="sgtm"), cfg, 1)
    model = build_gpt_model(cfg, cfg.transformer_config(on_gpu=device.type == "cuda", bf16=False), partition,
                            backend="gpu" if device.type == "cuda" else "local")
    regions = param_regions(model)
    pairs = [(p.detach().float().to(device), region_codes(regions[name], p.detach().to(device)))
             for name, p in model.named_parameters()]
    if not args.flat:
        return pairs
    flat = torch.cat([p.reshape(-1) for p, _ in pairs])
    codes = torch.cat([(c if c is not None else torch.full(p.shape, Region.JOINT, dtype=torch.uint8,
                                                           device=device)).reshape(-1) for p, c in pairs])
    return [(flat, codes)]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    pairs = model_tensors(args, device)
    gen = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen, device=device) * 1e-3 for p, _ in pairs]

    def params() -> list[torch.nn.Parameter]:
        out = [torch.nn.Parameter(p.clone()) for p, _ in pairs]
        for param, grad in zip(out, grads):
            param.grad = grad
        return out

    ref = torch.optim.AdamW(params(), foreach=True, **HYPER)
    ref_fused = torch.optim.AdamW(params(), fused=True, **HYPER)
    fresh_params, gated_params = params(), params()
    fresh, gated = SGTMAdamW(fresh_params, **HYPER), SGTMAdamW(gated_params, **HYPER)
    for opt, ps_ in ((fresh, fresh_params), (gated, gated_params)):
        for param, (_, codes) in zip(ps_, pairs):
            opt.set_region_codes(param, codes)
    gated.gate = Gate(retain=True)
    gated.step()  # from here on the regions' step counts differ

    def sgtm_step(gate: Gate) -> Callable[[], None]:
        def step() -> None:
            gated.gate = gate
            gated.step()
        return step

    variants: dict[str, Callable[[], None]] = {
        "torch": ref.step, "torch fused": ref_fused.step, "ungated (fresh)": fresh.step, "ungated": sgtm_step(Gate()),
        "gated retain": sgtm_step(Gate(retain=True)), "gated forget": sgtm_step(Gate(forget=True)),
    }
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.warmup + args.steps):
        for name, step in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= args.warmup:
                times[name].append((clock() - start) * 1e3)

    n_params = sum(p.numel() for p, _ in pairs)
    gated_numel = gated.gated_elements
    print(f"{n_params / 1e6:.1f}M parameters ({gated_numel / 1e6:.1f}M in Θ_R/Θ_F), hidden {args.hidden}, "
          f"{args.layers} layers, {'one flat buffer' if args.flat else 'one tensor per parameter'}, "
          f"{device.type}, torch threads {torch.get_num_threads()}, {'wall' if device.type == 'cuda' else 'CPU'} time")
    base, fused = statistics.median(times["torch"]), statistics.median(times["torch fused"])
    figures = {}
    print(f"{'variant':<18}{'ms/step':>10}{'vs torch':>10}{'vs fused':>10}{'spread':>10}")
    for name, values in times.items():
        median = statistics.median(values)
        spread = (max(values) - min(values)) / median
        figures[name] = {"ms": median, "ratio": median / base, "ratio_fused": median / fused, "spread": spread}
        print(f"{name:<18}{median:>10.1f}{median / base:>10.3f}{median / fused:>10.3f}{spread:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"params": n_params, "flat": args.flat, "variants": figures}, indent=2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
