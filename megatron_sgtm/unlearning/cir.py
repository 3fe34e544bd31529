"""CIR, Collapse of Irrelevant Representations (Sondej & Yang 2025, arXiv 2509.11816; the authors' ``CIR.py``).

The MLP linears (fc1, fc2) of layers 0..end-1 are trainable. Each epoch goes over a fixed list of forget
batches: the "MLP breaking" loss (per token, the positive part of <o_t, o_t^orig> / mean‖o^orig‖², averaged
over the MLPs of layers start..end-1) is backpropagated, and taps keep each linear's input activations a_t
and output gradients g_t (a document's first and last token left out). From the second epoch on, the
directions common to the forget data (the mean and top principal components of last epoch's a_t and g_t,
`torch.pca_lowrank`) are projected out of every token's a_t and g_t before W.grad = Σ_t g_t a_tᵀ, so
the update targets what is specific to the forget data; the whole update is rescaled to a fixed norm (SGD,
lr 1). A retain step then pulls the hidden state after layer end-1 back towards the original on a retain
batch (SGD). Training stops when the retain ("disruption") loss, cross-entropy on fixed retain training
batches, exceeds its start by the budget (0.1%); the epoch that crossed it is undone, so the written model
is the last one within budget (the authors keep the crossing epoch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from megatron_sgtm.unlearning.common import (
    Source,
    UnlearnError,
    check_layer,
    first_tensor,
    mlp_output,
    mlp_params,
    progress,
    tapped,
)


@dataclass
class CIRSettings:
    start: int | None = None  # None: the middle layers, 6/16..12/16 of the depth (the authors' 6..11 of 16)
    end: int | None = None  # exclusive
    act_directions: int = 24  # projected-out directions per linear input: the mean + 23 principal components
    grad_directions: int = 36  # per linear output gradient: the mean + 35 principal components
    unlearning_rate: float = 0.2  # norm of each forget update
    retaining_rate: float = 3e-4  # SGD learning rate of the retain step
    loss_budget: float = 1.001  # stop when the disruption loss exceeds its start by this factor
    max_epochs: int = 200
    batch_size: int = 8
    forget_batches: int = 16  # forget (and paired retain) batches per epoch
    disruption_batches: int = 8
    pca_iters: int = 16
    seed: int = 42


def default_range(num_layers: int) -> tuple[int, int]:
    start = min(num_layers - 1, round(num_layers * 6 / 16))
    return start, max(start + 1, round(num_layers * 12 / 16))


def _check(settings: CIRSettings, start: int, end: int, num_layers: int) -> None:
    check_layer("--start-layer", start, num_layers)
    check_layer("--end-layer (exclusive) - 1", end - 1, num_layers)
    if end <= start:
        raise UnlearnError(f"--end-layer {end}: must be above --start-layer {start}")
    for flag, value in (("--max-epochs", settings.max_epochs), ("--batch-size", settings.batch_size),
                        ("--forget-batches", settings.forget_batches),
                        ("--disruption-batches", settings.disruption_batches),
                        ("--act-directions", settings.act_directions),
                        ("--grad-directions", settings.grad_directions)):
        if value < 1:
            raise UnlearnError(f"{flag} {value}: must be at least 1")


class _Linears:
    """Taps on the trainable linears: each forward keeps the input activations, each backward the output
    gradient, as [tokens, features] rows of the selected tokens."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules
        self.acts: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.rows: torch.Tensor | None = None

    @contextlib.contextmanager
    def tapping(self, rows: torch.Tensor) -> Iterator[None]:
        self.rows = rows

        def hook(name: str):
            def keep(_module, inputs, output):
                self.acts[name] = inputs[0].detach()[rows]
                first_tensor(output).register_hook(lambda g: self.grads.__setitem__(name, g.detach()[rows]))
            return keep

        handles = [m.register_forward_hook(hook(n)) for n, m in self.modules.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _basis(vectors: torch.Tensor, directions: int, iters: int) -> torch.Tensor:
    """Orthonormal columns spanning the mean and the top principal components of `vectors` [n, d]: at most
    half of d, so a small model keeps a subspace to update."""
    n, d = vectors.shape
    count = max(1, min(directions, d // 2, n))
    mean = vectors.mean(dim=0, keepdim=True)
    parts = [mean]
    if count > 1:
        _, _, v = torch.pca_lowrank(vectors, q=count - 1, center=True, niter=iters)
        parts.append(v.T)
    q, _ = torch.linalg.qr(torch.cat(parts).T)
    return q


def _collapse(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return x - (x @ basis) @ basis.T


def unlearn(source: Source, settings: CIRSettings) -> tuple[dict, dict, dict]:
    """Run CIR on `source.module` in place; returns (resolved settings, the trainable parameters, their
    starting values)."""
    start, end = default_range(source.num_layers)
    start = start if settings.start is None else settings.start
    end = end if settings.end is None else settings.end
    _check(settings, start, end, source.num_layers)
    layers = source.module.decoder.layers
    params = mlp_params(source.module, list(range(end)), biases=False)
    originals = {n: p.detach().clone() for n, p in params.items()}
    linears = _Linears({n.removesuffix(".weight"): source.module.get_submodule(n.removesuffix(".weight"))
                        for n in params})
    mlps = {i: layers[i].mlp for i in range(start, end)}
    last = layers[end - 1]
    torch.manual_seed(settings.seed)
    forget_stream = source.stream(source.forget_docs, settings.batch_size, settings.seed)
    retain_stream = source.stream(source.retain_docs, settings.batch_size, settings.seed + 1)
    forget = [next(forget_stream) for _ in range(settings.forget_batches)]
    retain = [next(retain_stream) for _ in range(settings.forget_batches)]
    disruption = [next(retain_stream) for _ in range(settings.disruption_batches)]

    def token_rows(mb: dict) -> torch.Tensor:  # the authors leave out the first and last token
        return source.rows((mb["loss_mask"] > 0) & (mb["position_ids"] > 0))

    # The original MLP outputs on the forget batches and hidden states on the retain batches.
    org_out, org_hidden = [], []
    with torch.no_grad():
        for mb in forget:
            with tapped(mlps, stop=mlps[end - 1]) as out:
                source.forward(mb)
            rows = token_rows(mb)
            org_out.append({i: mlp_output(out[i])[rows] for i in mlps})
        for mb in retain:
            with tapped({"h": last}, stop=last) as out:
                source.forward(mb)
            org_hidden.append(first_tensor(out["h"]))

    start_loss = source.mean_loss(disruption)
    budget = start_loss * settings.loss_budget
    resolved = {**asdict(settings), "start": start, "end": end}
    progress(f"cir: breaking the MLPs of layers {start}..{end - 1}, updating the MLP weights of layers 0..{end - 1} "
             f"({len(params)} tensors); disruption loss {start_loss:.4f}, budget {budget:.4f}; {len(forget)} forget "
             f"batches of {settings.batch_size} per epoch, at most {settings.max_epochs} epochs")
    unit = torch.optim.SGD(params.values(), lr=1.0)
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    epochs_done = 0
    for epoch in range(settings.max_epochs):
        kept = {n: p.detach().clone() for n, p in params.items()}
        acts = {n: [] for n in linears.modules}
        grads = {n: [] for n in linears.modules}
        breaking = 0.0
        for f_mb, r_mb, originals_out, hidden0 in zip(forget, retain, org_out, org_hidden, strict=True):
            unit.zero_grad(set_to_none=True)
            rows = token_rows(f_mb)
            with linears.tapping(rows), tapped(mlps, stop=mlps[end - 1]) as out:
                source.forward(f_mb)
                loss = 0.0
                for i in mlps:
                    o, o0 = mlp_output(out[i])[rows], originals_out[i]
                    dots = (o * o0).sum(-1) / o0.norm(dim=-1).mean() ** 2
                    loss = loss + dots.clamp(min=0).mean()
                loss = loss / len(mlps)
                loss.backward()
            breaking += float(loss)
            for name in linears.modules:
                a, g = linears.acts[name], linears.grads[name]
                acts[name].append(a)
                grads[name].append(g)
                if epoch:
                    a_basis, g_basis = bases[name]
                    params[f"{name}.weight"].grad = _collapse(g, g_basis).T @ _collapse(a, a_basis)
            if not epoch:
                continue
            norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params.values() if p.grad is not None))
            for p in params.values():
                if p.grad is not None:
                    p.grad.mul_(settings.unlearning_rate / max(float(norm), 1e-12))
            unit.step()
            unit.zero_grad(set_to_none=True)
            with tapped({"h": last}, stop=last) as out:
                source.forward(r_mb)
            hidden = first_tensor(out["h"])
            retain_loss = (hidden - hidden0).norm(dim=-1).mean() / hidden0.norm(dim=-1).mean()
            retain_loss.backward()
            for p in params.values():
                if p.grad is not None:
                    p.grad.mul_(settings.retaining_rate)
            unit.step()
        bases = {n: (_basis(torch.cat(acts[n]), settings.act_directions, settings.pca_iters),
                     _basis(torch.cat(grads[n]), settings.grad_directions, settings.pca_iters)) for n in acts}
        loss_now = source.mean_loss(disruption)
        progress(f"cir epoch {epoch:4d} | breaking loss {breaking / len(forget):.4f} | disruption loss {loss_now:.4f} "
                 f"(start {start_loss:.4f})")
        if loss_now > budget:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(kept[name])
            progress(f"cir: epoch {epoch} crossed the disruption budget; its update is undone, stopping")
            break
        epochs_done = epoch + 1
    unit.zero_grad(set_to_none=True)
    resolved.update(epochs=epochs_done, disruption_start=start_loss)
    return resolved, params, originals
