"""Worker: document attention through `PackedSeqParams` (THD) against the dense [b, 1, s, s] mask.

argv: OUT_DIR [--single-device | --single-device-bf16]. Rank 0 saves the largest packed-vs-dense differences
and the dense magnitudes, per architecture (gpt2: learned positions; llama: RoPE, GQA) and case.

4 gloo ranks (default): for each TP x PP x SP layout it builds one `MegatronEngine` and runs the same
micro-batches (packed documents of mixed labels and lengths, a padding tail) through the engine's own
`_run` (megatron's schedule, shared `Engine._forward`) with ``data.attention`` dense and then packed: a
training pass with labels (per-token losses and the gradients, gathered to global tensors) and an
evaluation pass without.

``--single-device`` (1 rank; the GPU check): the ``gpu`` backend's SGTM model (Transformer Engine's
varlen attention where installed; bf16 on CUDA) fed `PackedSeqParams`, against the ``local`` backend
(SDPA) with the dense mask, same weights and device: losses and gradients of one labelled pass. In bf16 (on
CUDA, or ``--single-device-bf16`` on any device) the two paths round differently, so each is also compared
with an fp32 dense pass of the same weights: packed must be about as close to it as dense is. Where the
``gpu`` backend builds the ``local`` modules (no TE, no apex: every CPU machine here) that case would only
repeat ``local``'s, so it is left out (`gpu_backend_is_local`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sgtm.training.distributed import init_distributed

if __name__ == "__main__":  # the test module imports this file for its layouts
    init_distributed()  # CPU shims before megatron modules are imported and built

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402

from megatron_sgtm.core.labels import TokenLabel, token_labels  # noqa: E402
from megatron_sgtm.core.layers.spec import get_sgtm_layer_spec  # noqa: E402
from megatron_sgtm.layout import gather_global, load_global  # noqa: E402
from megatron_sgtm.model import build_gpt_model  # noqa: E402
from megatron_sgtm.training.batch_geometry import model_inputs  # noqa: E402
from megatron_sgtm.training.config import from_dict  # noqa: E402
from megatron_sgtm.training.engine_megatron import MegatronEngine  # noqa: E402
from tests.support.sgtm_cases import random_global_state  # noqa: E402

SEQ, MBS = 16, 2
U, R, F = TokenLabel.UNLABELED, TokenLabel.RETAIN, TokenLabel.FORGET
# Per micro-batch, per row: (label, length) of each document. Equal lengths in one row and across rows,
# one-token documents, and a padding tail (its own segment, no loss), as the sampler packs them.
ROWS = [
    [[(R, 5), (F, 6), (U, 5)], [(F, 16)]],
    [[(U, 1), (R, 7), (F, 8)], [(R, 4), (F, 4), (U, 3), (R, 1), ("pad", 4)]],
]
LAYOUTS = ((1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False), (2, 2, True))
ARCHS = {
    "gpt2": ({"arch": "gpt2"}, {"forget_heads": 1, "forget_mlp_units": 8}),
    "llama": ({"arch": "llama", "num_query_groups": 2},
              {"forget_heads": 2, "forget_mlp_units": 4, "mask_embeddings": True}),
}


def make_batches(vocab: int) -> list[dict[str, torch.Tensor]]:
    """Identical on every rank (so DP replicas agree and the comparison covers every shard)."""
    gen = torch.Generator().manual_seed(5)
    batches = []
    for rows in ROWS:
        labels, positions, loss_mask = [], [], []
        for docs in rows:
            for label, length in docs:
                positions.append(torch.arange(length))
                labels.append(torch.full((length,), U if label == "pad" else label, dtype=torch.uint8))
                keep = torch.zeros(length) if label == "pad" else torch.ones(length)
                keep[-1] = 0.0  # the last token's target is the next document's first
                loss_mask.append(keep)
        tokens = torch.randint(0, vocab, (MBS, SEQ + 1), generator=gen)
        batches.append({
            "tokens": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous(),
            "token_labels": torch.cat(labels).view(MBS, SEQ), "position_ids": torch.cat(positions).view(MBS, SEQ),
            "loss_mask": torch.cat(loss_mask).view(MBS, SEQ),
        })
    return batches


def config(arch: str, tp: int, pp: int, sp: bool, hidden: int = 32):
    model, sgtm = ARCHS[arch]
    dp = dist.get_world_size() // (tp * pp)
    return from_dict({
        "method": "sgtm",
        "model": {"num_layers": 2, "hidden_size": hidden, "num_attention_heads": 4, "ffn_hidden_size": 2 * hidden,
                  "vocab_size": 64, "seq_length": SEQ, **model},
        "sgtm": sgtm,
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "sequence_parallel": sp},
        "optim": {"micro_batch_size": MBS, "global_batch_size": MBS * len(ROWS) * dp},
    })


def run(engine: MegatronEngine, attention: str, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Per-token losses (train and eval passes) and global gradients of one pass per kind, on every rank."""
    engine.cfg.data.attention = attention
    losses: list[torch.Tensor] = []
    forward = engine._forward

    def recording(module, mb, use_labels):
        out = forward(module, mb, use_labels)
        if ps.is_pipeline_last_stage():
            if out.shape != mb["tokens"].shape:
                raise AssertionError(f"{attention}: losses {tuple(out.shape)} for a batch {tuple(mb['tokens'].shape)}")
            losses.append(out.detach().float().clone())
        return out

    engine._forward = recording
    engine.ddp.zero_grad_buffer()
    engine._run(batches, forward_only=False, use_labels=True)
    grads = gather_global(engine.model, {n: p.main_grad for n, p in engine.model.named_parameters()})
    engine._run(batches, forward_only=True, use_labels=False)
    del engine._forward
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, torch.stack(losses) if losses else None)
    stacked = next(x for x in everyone if x is not None)  # [2 passes x micro-batches, b, s]
    half = len(stacked) // 2
    return {"train_losses": stacked[:half], "eval_losses": stacked[half:], **{f"grad/{n}": g for n, g in grads.items()}}


def compare(results: dict, key: str, reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    for name in reference:
        results[f"{key}/{name}/max_diff"] = (reference[name] - other[name]).abs().max()
        results[f"{key}/{name}/max_abs"] = reference[name].abs().max()


def layouts() -> dict[str, torch.Tensor]:
    """Every layout's packed-vs-dense differences through the megatron engine (4 ranks)."""
    results: dict[str, torch.Tensor] = {}
    for arch in ARCHS:
        for tp, pp, sp in LAYOUTS:
            cfg = config(arch, tp, pp, sp)
            engine = MegatronEngine(cfg, cfg.sgtm.resolve(cfg.model.dims()), on_gpu=False)
            batches = make_batches(cfg.model.vocab_size)
            dense, packed = run(engine, "dense", batches), run(engine, "packed", batches)
            compare(results, f"{arch}/tp{tp}pp{pp}{'sp' if sp else ''}", dense, packed)
            engine.shutdown()
    return results


def labelled_pass(model, batches: list[dict], packed: bool) -> dict[str, torch.Tensor]:
    """Per-token losses and parameter gradients of one forward/backward with labels, without megatron's
    schedule (one rank)."""
    model.zero_grad(set_to_none=True)
    losses = []
    for mb in batches:
        inputs, attention = model_inputs(mb, document_attention=True, packed=packed)
        with token_labels(inputs["token_labels"]):
            per_token = model(inputs["tokens"], inputs["position_ids"], labels=inputs["targets"], **attention)
        per_token = per_token.reshape(mb["tokens"].shape).float()
        (per_token * mb["loss_mask"]).sum().backward()
        losses.append(per_token.detach())
    grads = {n: p.grad for n, p in model.named_parameters()}
    return {"losses": torch.stack(losses).cpu(), **{f"grad/{n}": g for n, g in gather_global(model, grads).items()}}


def gpu_backend_is_local() -> bool:
    """Whether the ``gpu`` backend builds the same core attention and norm as ``local`` on this install."""
    def modules(backend: str) -> tuple:
        layer = get_sgtm_layer_spec(None, backend).submodules
        return layer.self_attention.submodules.core_attention, layer.input_layernorm

    return modules("gpu") == modules("local")


def relative_errors(results: dict, key: str, reference: dict[str, torch.Tensor],
                    other: dict[str, torch.Tensor]) -> None:
    """‖other − reference‖ / ‖reference‖ per tensor, against the fp32 reference."""
    for name, ref in reference.items():
        ref = ref.double()
        results[f"{key}/{name}/rel_err"] = ((other[name].double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _single_device_model(cfg, partition, backend: str, device: torch.device, bf16: bool):
    transformer = cfg.model.transformer_config(on_gpu=device.type == "cuda", bf16=bf16)
    # bf16: every parameter, as megatron's Float16Module casts them (the position embedding is built fp32)
    return build_gpt_model(cfg.model, transformer, partition, backend=backend).to(device=device,
                                                                                   dtype=transformer.params_dtype)


def single_device(bf16: bool) -> dict:
    """The ``gpu`` backend with `PackedSeqParams` against the ``local`` one with the dense mask, one rank."""
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    ps.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)
    results: dict = {"device": device.type, "dtype": "bf16" if bf16 else "fp32"}
    backends = ("local",) if gpu_backend_is_local() else ("gpu", "local")
    for arch in ARCHS:
        cfg = config(arch, 1, 1, False, hidden=128)  # head dim 32: what fused kernels take
        partition = cfg.sgtm.resolve(cfg.model.dims())

        models = {backend: _single_device_model(cfg, partition, backend, device, bf16) for backend in backends}
        state = random_global_state(gather_global(models["local"]), seed=7)
        for model in models.values():
            load_global(model, state)
        results[f"{arch}/core_attention"] = type(models[backends[0]].decoder.layers[0].self_attention.core_attention
                                                 ).__name__
        batches = [{k: v.to(device) for k, v in mb.items()} for mb in make_batches(cfg.model.vocab_size)]
        reference = labelled_pass(models["local"], batches, packed=False)
        if bf16:
            fp32 = _single_device_model(cfg, partition, "local", device, bf16=False)
            load_global(fp32, state)
            exact = labelled_pass(fp32, batches, packed=False)
            relative_errors(results, f"{arch}/local_dense", exact, reference)
        for backend in backends:
            packed = labelled_pass(models[backend], batches, packed=True)
            compare(results, f"{arch}/{backend}_packed", reference, packed)
            if bf16:
                relative_errors(results, f"{arch}/{backend}_packed", exact, packed)
    ps.destroy_model_parallel()
    return results


def main(out_dir: str, mode: str | None = None) -> None:
    if mode in ("--single-device", "--single-device-bf16"):
        results = single_device(bf16=torch.cuda.is_available() or mode == "--single-device-bf16")
    else:
        results = layouts()
    if dist.get_rank() == 0:
        torch.save(results, Path(out_dir) / "results.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
