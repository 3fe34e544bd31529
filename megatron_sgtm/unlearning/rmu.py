"""RMU (Li et al. 2024, WMDP), as the SGTM paper's baseline runs it (its ``rmu.py``).

A fixed random control vector c·u/‖u‖ (u ~ U[0,1)^d); each step takes a forget and a retain batch and
minimises MSE(h_l(forget), c·u) + α·MSE(h_l(retain), h_l^frozen(retain)) on the output of decoder layer l,
updating only the MLP fc1/fc2 weights and biases of layers l-2..l with AdamW. The frozen model is the same
module with those parameters at their starting values. c must be large against the activations' norms
(logged) for the forget activations to be scrambled rather than nudged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from megatron_sgtm.unlearning.common import (
    UnlearnError,
    Unlearning,
    check_layer,
    first_tensor,
    mlp_params,
    original_weights,
    progress,
    tapped,
)


@dataclass
class RMUSettings:
    layer: int | None = None  # None: 7/16 of the depth (the paper's layer 7 of 16)
    steering_coeff: float = 20.0
    alpha: float = 100.0
    lr: float = 5e-5
    steps: int = 250
    batch_size: int = 4
    seed: int = 42
    log_interval: int = 25


def default_layer(num_layers: int) -> int:
    return min(num_layers - 1, round(num_layers * 7 / 16))


def _check(settings: RMUSettings) -> None:
    for flag, value in (("--steps", settings.steps), ("--batch-size", settings.batch_size)):
        if value < 1:
            raise UnlearnError(f"{flag} {value}: must be at least 1")
    if settings.lr <= 0:
        raise UnlearnError(f"--lr {settings.lr}: must be positive")


def unlearn(source: Unlearning, settings: RMUSettings) -> tuple[dict, dict, dict]:
    """Run RMU on `source.module` in place; returns (resolved settings, the trainable parameters, their
    starting values)."""
    _check(settings)
    layer = default_layer(source.num_layers) if settings.layer is None else settings.layer
    check_layer("--layer", layer, source.num_layers)
    updated = list(range(max(0, layer - 2), layer + 1))
    params = mlp_params(source.module, updated, biases=True)
    originals = {n: p.detach().clone() for n, p in params.items()}
    torch.manual_seed(settings.seed)
    hidden = source.cfg.model.hidden_size
    u = torch.rand(hidden)
    control = u / u.norm() * settings.steering_coeff
    optimizer = torch.optim.AdamW(params.values(), lr=settings.lr)
    forget = source.stream(source.forget_docs, settings.batch_size, settings.seed)
    retain = source.stream(source.retain_docs, settings.batch_size, settings.seed + 1)
    target = source.module.decoder.layers[layer]

    def activations(mb: dict) -> torch.Tensor:
        with tapped({"h": target}, stop=target) as out:
            source.forward(mb)
        return first_tensor(out["h"])[source.rows(mb["loss_mask"] > 0)]

    resolved = {**asdict(settings), "layer": layer, "updated_layers": updated}
    progress(f"rmu: layer {layer}, updating the MLPs of layers {updated} ({len(params)} tensors), c="
             f"{settings.steering_coeff}, alpha={settings.alpha}, lr={settings.lr}, {settings.steps} steps of "
             f"{settings.batch_size} sequences")
    for step in range(1, settings.steps + 1):
        f_mb, r_mb = next(forget), next(retain)
        h_forget, h_retain = activations(f_mb), activations(r_mb)
        with original_weights(params, originals):
            h_frozen = activations(r_mb)
        forget_loss = F.mse_loss(h_forget, control.expand_as(h_forget))
        retain_loss = F.mse_loss(h_retain, h_frozen)
        loss = forget_loss + settings.alpha * retain_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        norms = [float(h.detach().norm(dim=-1).mean()) for h in (h_forget, h_retain, h_frozen)]
        if step == 1:
            progress(f"rmu: activation norms at layer {layer}: forget {norms[0]:.2f}, retain {norms[2]:.2f} "
                     f"(steering coefficient {settings.steering_coeff}; it should be large against them)")
            resolved["activation_norms"] = {"forget": norms[0], "retain": norms[2]}
        if step % settings.log_interval == 0 or step == settings.steps:
            progress(f"rmu step {step:5d}/{settings.steps} | forget mse {forget_loss.item():.4f} | retain mse "
                     f"{retain_loss.item():.6f} | forget norm {norms[0]:.2f} | retain norm {norms[1]:.2f}")
    return resolved, params, originals
