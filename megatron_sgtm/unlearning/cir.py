"""CIR, Collapse of Irrelevant Representations (Sondej & Yang 2025, arXiv 2509.11816; the authors' ``CIR.py``).

The MLP linears (fc1, fc2) of layers 0..end-1 are trainable. Each epoch goes over a fixed list of forget
batches: a forget loss is backpropagated and taps keep each linear's input activations a_t and output
gradients g_t (a document's first and last token left out). From the second epoch on, W.grad = Σ_t g_t a_tᵀ
is formed from *collapsed* a_t (and optionally g_t), so the update targets what is specific to the forget
data; the whole update is rescaled to a fixed norm (SGD, lr 1). A retain step then pulls the hidden state
after layer end-1 back towards the original on a retain batch (SGD). Training stops when the retain
("disruption") loss, cross-entropy on fixed retain training batches, exceeds its start by the budget (0.1%);
the epoch that crossed it is undone, so the written model is the last one within budget.

Two settings choose between the paper's first version and what separates a whole domain (docs/
reference_differences.md has the measurements):
- ``collapse``: "forget" projects the mean and top principal components of last epoch's forget activations
  out of every a_t (the paper: the directions common to the forget data are irrelevant to it); "retain"
  (default) whitens a_t by the retain activations' second moment, a_t ← (M_r + λI)⁻¹ a_t, which turns the
  update into the one that moves the forget objective most per unit change of the layer's outputs on retain
  data. When the forget set is a whole language, its common directions *are* the language, and only the
  retain collapse leaves an update that does not also move the retain data.
- ``forget_loss``: "label-logit" (default; the authors' later CIR) lowers the logit of each forget token's
  next token; "mlp-breaking" (the paper) drives the MLP outputs of layers start..end-1 away from their
  originals (positive part of <o_t, o_t^orig> / mean‖o^orig‖²).
``disruption_mask`` (default on; the authors' later CIR, after MUDMAN) keeps only the forget tokens whose
contribution g_t a_tᵀ lowers the retain cross-entropy to first order, judged against a momentum average of
its gradient taken on a retain batch before every update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from megatron_sgtm.unlearning.common import (
    UnlearnError,
    Unlearning,
    check_layer,
    first_tensor,
    mlp_output,
    mlp_params,
    progress,
    tapped,
)

COLLAPSES = ("retain", "forget")
FORGET_LOSSES = ("label-logit", "mlp-breaking")


@dataclass
class CIRSettings:
    start: int | None = None  # None: the middle layers, 6/16..12/16 of the depth (the authors' 6..11 of 16)
    end: int | None = None  # exclusive
    collapse: str = "retain"  # see the module docstring; "forget" is the paper's
    forget_loss: str = "label-logit"  # "mlp-breaking" is the paper's
    disruption_mask: bool = True
    act_directions: int = 24  # collapse=forget: the mean + 23 principal components per linear input
    grad_directions: int = 0  # output-gradient directions projected out (the mean + PCs); 0: none (paper: 36)
    ridge: float = 1e-3  # collapse=retain: λ = ridge · trace(M_r) / width
    retain_momentum: float = 0.9  # of the retain gradient the disruption mask judges against
    unlearning_rate: float = 0.05  # norm of each forget update
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


def check_layers(settings: CIRSettings, start: int, end: int, num_layers: int) -> None:
    check_layer("--start-layer", start, num_layers)
    check_layer("--end-layer (exclusive) - 1", end - 1, num_layers)
    if end <= start:
        raise UnlearnError(f"--end-layer {end}: must be above --start-layer {start}")
    for flag, value in (("--max-epochs", settings.max_epochs), ("--batch-size", settings.batch_size),
                        ("--forget-batches", settings.forget_batches),
                        ("--disruption-batches", settings.disruption_batches),
                        ("--act-directions", settings.act_directions)):
        if value < 1:
            raise UnlearnError(f"{flag} {value}: must be at least 1")
    if settings.grad_directions < 0:
        raise UnlearnError(f"--grad-directions {settings.grad_directions}: must be 0 (off) or more")
    if settings.collapse not in COLLAPSES:
        raise UnlearnError(f"--collapse {settings.collapse}: must be one of {list(COLLAPSES)}")
    if settings.forget_loss not in FORGET_LOSSES:
        raise UnlearnError(f"--forget-loss {settings.forget_loss}: must be one of {list(FORGET_LOSSES)}")
    if settings.ridge <= 0:
        raise UnlearnError(f"--ridge {settings.ridge}: must be positive")
    if not 0 <= settings.retain_momentum < 1:
        raise UnlearnError(f"--retain-momentum {settings.retain_momentum}: must be in [0, 1)")


class _Linears:
    """Taps on the trainable linears: each forward keeps the input activations, each backward the output
    gradient, as [tokens, features] rows of the selected tokens."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules
        self.acts: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def tapping(self, rows: torch.Tensor) -> Iterator[None]:
        def hook(name: str):
            def keep(_module, inputs, output):
                self.acts[name] = inputs[0].detach()[rows]
                if (out := first_tensor(output)).requires_grad:
                    out.register_hook(lambda g: self.grads.__setitem__(name, g.detach()[rows]))
            return keep

        handles = [m.register_forward_hook(hook(n)) for n, m in self.modules.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def mean_and_top_components(vectors: torch.Tensor, directions: int, iters: int) -> torch.Tensor:
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


def project_out(basis: torch.Tensor) -> torch.Tensor:
    """The [d, d] map x ↦ x - B Bᵀ x (rows multiply from the left: x @ map)."""
    return torch.eye(basis.shape[0]) - basis @ basis.T


def whitening(acts: torch.Tensor, ridge: float) -> torch.Tensor:
    """(M + λI)⁻¹ for the second moment M of `acts` [n, d], λ = ridge · trace(M) / d."""
    moment = acts.T @ acts / acts.shape[0]
    d = moment.shape[0]
    return torch.linalg.inv(moment + ridge * torch.trace(moment) / d * torch.eye(d))


def unlearn(source: Unlearning, settings: CIRSettings) -> tuple[dict, dict, dict]:
    """Run CIR on `source.module` in place; returns (resolved settings, the trainable parameters, their
    starting values)."""
    start, end = default_range(source.num_layers)
    start = start if settings.start is None else settings.start
    end = end if settings.end is None else settings.end
    check_layers(settings, start, end, source.num_layers)
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

    def token_mask(mb: dict) -> torch.Tensor:  # the authors leave out the first and last token
        return (mb["loss_mask"] > 0) & (mb["position_ids"] > 0)

    # The original MLP outputs on the forget batches and hidden states on the retain batches.
    org_out, org_hidden = [], []
    with torch.no_grad():
        if settings.forget_loss == "mlp-breaking":
            for mb in forget:
                with tapped(mlps, stop=mlps[end - 1]) as out:
                    source.forward(mb)
                rows = source.rows(token_mask(mb))
                org_out.append({i: mlp_output(out[i])[rows] for i in mlps})
        for mb in retain:
            with tapped({"h": last}, stop=last) as out:
                source.forward(mb)
            org_hidden.append(first_tensor(out["h"]))

    def forget_loss(mb: dict, originals_out: dict | None) -> torch.Tensor:
        mask = token_mask(mb)
        if settings.forget_loss == "label-logit":
            logits = source.forward(mb)
            return logits.gather(-1, mb["targets"].unsqueeze(-1)).squeeze(-1)[mask].mean()
        rows = source.rows(mask)
        with tapped(mlps, stop=mlps[end - 1]) as out:
            source.forward(mb)
        loss = 0.0
        for i in mlps:
            o, o0 = mlp_output(out[i])[rows], originals_out[i]
            loss = loss + ((o * o0).sum(-1) / o0.norm(dim=-1).mean() ** 2).clamp(min=0).mean()
        return loss / len(mlps)

    def retain_activations() -> dict[str, list]:
        acts = {n: [] for n in linears.modules}
        with torch.no_grad():
            for mb in retain:
                with linears.tapping(source.rows(token_mask(mb))):
                    source.forward(mb)
                for n in linears.modules:
                    acts[n].append(linears.acts[n])
        return acts

    def collapse_maps(forget_acts: dict[str, list], forget_grads: dict[str, list]) -> dict[str, tuple]:
        """Per linear, (the map applied to a_t rows, the one applied to g_t rows or None), from this epoch's
        statistics (the model as it is now)."""
        acts = retain_activations() if settings.collapse == "retain" else forget_acts
        maps = {}
        for n in linears.modules:
            a = torch.cat(acts[n]).float()
            a_map = (whitening(a, settings.ridge) if settings.collapse == "retain"
                     else project_out(mean_and_top_components(a, settings.act_directions, settings.pca_iters)))
            g_map = (project_out(mean_and_top_components(torch.cat(forget_grads[n]).float(), settings.grad_directions,
                                         settings.pca_iters)) if settings.grad_directions else None)
            maps[n] = (a_map, g_map)
        return maps

    start_loss = source.mean_loss(disruption)
    budget = start_loss * settings.loss_budget
    resolved = {**asdict(settings), "start": start, "end": end}
    target = ("lowering the forget tokens' logits" if settings.forget_loss == "label-logit"
              else f"breaking the MLPs of layers {start}..{end - 1}")
    progress(f"cir: {target}, updating the MLP weights of layers 0..{end - 1} ({len(params)} tensors), "
             f"collapse={settings.collapse}, disruption mask {'on' if settings.disruption_mask else 'off'}; "
             f"disruption loss {start_loss:.4f}, budget {budget:.4f}; {len(forget)} forget batches of "
             f"{settings.batch_size} per epoch, at most {settings.max_epochs} epochs")
    unit = torch.optim.SGD(params.values(), lr=1.0)
    maps: dict[str, tuple] = {}
    retain_grads: dict[str, torch.Tensor] = {}
    epochs_done = 0
    for epoch in range(settings.max_epochs):
        kept = {n: p.detach().clone() for n, p in params.items()}
        acts = {n: [] for n in linears.modules}
        grads = {n: [] for n in linears.modules}
        total, kept_tokens, tokens = 0.0, 0, 0
        for i, (f_mb, r_mb, hidden0) in enumerate(zip(forget, retain, org_hidden, strict=True)):
            if epoch and settings.disruption_mask:
                unit.zero_grad(set_to_none=True)
                source.mean_ce(r_mb).backward()
                beta = settings.retain_momentum if retain_grads else 0.0
                for name in linears.modules:
                    grad = params[f"{name}.weight"].grad
                    retain_grads[name] = beta * retain_grads.get(name, grad) + (1 - beta) * grad
            unit.zero_grad(set_to_none=True)
            with linears.tapping(source.rows(token_mask(f_mb))):
                loss = forget_loss(f_mb, org_out[i] if org_out else None)
                loss.backward()
            total += float(loss)
            for name in linears.modules:
                a, g = linears.acts[name], linears.grads[name]
                acts[name].append(a)
                grads[name].append(g)
                if not epoch:
                    continue
                a_map, g_map = maps[name]
                a = a @ a_map
                g = g if g_map is None else g @ g_map
                if settings.disruption_mask:
                    keep = ((g @ retain_grads[name]) * a).sum(-1) > 0
                    a, g = a[keep], g[keep]
                    kept_tokens, tokens = kept_tokens + int(keep.sum()), tokens + len(keep)
                params[f"{name}.weight"].grad = g.T @ a
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
            ((hidden - hidden0).norm(dim=-1).mean() / hidden0.norm(dim=-1).mean()).backward()
            for p in params.values():
                if p.grad is not None:
                    p.grad.mul_(settings.retaining_rate)
            unit.step()
        maps = collapse_maps(acts, grads)
        loss_now = source.mean_loss(disruption)
        masked = f" | tokens kept by the mask {kept_tokens / tokens:.2f}" if tokens else ""
        progress(f"cir epoch {epoch:4d} | forget loss ({settings.forget_loss}) {total / len(forget):.4f} | "
                 f"disruption loss {loss_now:.4f} (start {start_loss:.4f}){masked}")
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
