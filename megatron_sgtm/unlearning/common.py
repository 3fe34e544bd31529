"""What RMU and CIR share: the source model and its data, activation taps, losses, and the checkpoint they write.

The model is the checkpoint's global (TP=1, PP=1) module in this process (`export.native.load_native`), so
any engine or layout works and the updated tensors are the ones `write_model_only` saves. The forget and
retain sets are the non-held-out documents of the run's forget and retain categories (ground truth, as the
evaluation uses); the held-out documents stay unseen and measure the effect.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_sgtm.data.sampler import SGTMSampler, eval_batches
from megatron_sgtm.data.shards import TOKENIZER_FILE
from megatron_sgtm.errors import UserError
from megatron_sgtm.training.batch_geometry import model_inputs


class UnlearnError(UserError, ValueError):
    """Bad unlearning input (a flag, an empty forget set); one line naming it."""


class _Stop(Exception):
    """Raised by a tap after the deepest module a loss reads: the rest of the forward is not needed."""


@dataclass
class Unlearning:
    """The model being unlearned (updated in place) and the documents it is unlearned on."""

    path: Path
    ckpt: object  # export.native.NativeCheckpoint
    cfg: object  # training.config.TrainConfig: the run's data, labeling and attention settings
    data: object  # training.run_data.RunData
    forget_docs: np.ndarray
    retain_docs: np.ndarray

    @property
    def module(self) -> torch.nn.Module:
        return self.ckpt.module

    @property
    def num_layers(self) -> int:
        return len(self.module.decoder.layers)

    @property
    def packed(self) -> bool:
        return self.cfg.data.document_attention and self.cfg.data.attention == "packed"

    def stream(self, docs: np.ndarray, batch_size: int, seed: int) -> Iterator[dict]:
        """Micro-batches of `batch_size` packed sequences over `docs`, shuffled per epoch by `seed`, endless."""
        return SGTMSampler(self.data.corpus, self.data.doc_labels, seq_length=self.cfg.model.seq_length,
                           micro_batch_size=batch_size, global_batch_size=batch_size, seed=seed, documents=docs)

    def heldout(self, categories: list[str], count: int) -> list[dict]:
        """The first `count` micro-batches over the held-out documents of `categories` (the run's eval stream)."""
        docs = self.data.heldout_docs[self.data.corpus.category_mask(categories)[self.data.heldout_docs]]
        stream = eval_batches(self.data.corpus, docs, self.data.doc_labels, seq_length=self.cfg.model.seq_length,
                              micro_batch_size=self.cfg.optim.micro_batch_size)
        return [b for _, b in zip(range(count), stream)]

    def forward(self, mb: dict, labels: bool = False) -> torch.Tensor | None:
        """The model on one micro-batch, without SGTM labels: per-token losses [b, s] with `labels`, else the
        logits [b, s, vocab]; None when a tap's `_Stop` ended the forward where the caller's loss stops reading."""
        inputs, attention = model_inputs(mb, self.cfg.data.document_attention, self.packed)
        try:
            out = self.module(inputs["tokens"], inputs["position_ids"],
                              labels=inputs["targets"] if labels else None, **attention)
        except _Stop:
            return None
        return out.reshape(mb["tokens"].shape) if labels else out.reshape(*mb["tokens"].shape, -1)

    def mean_ce(self, mb: dict) -> torch.Tensor:
        """Mean cross-entropy over the micro-batch's loss tokens, differentiable."""
        return (self.forward(mb, labels=True) * mb["loss_mask"]).sum() / mb["loss_mask"].sum().clamp(min=1)

    def rows(self, mask: torch.Tensor) -> torch.Tensor:
        """A [b, s] token mask in the layout of the model's activations ([s, b], or [b*s, 1] when packed)."""
        return mask.reshape(-1, 1) if self.packed else mask.t()

    @torch.no_grad()
    def mean_loss(self, batches: list[dict]) -> float:
        """Token-weighted mean cross-entropy over `batches`."""
        counts = [float(mb["loss_mask"].sum()) for mb in batches]
        return sum(float(self.mean_ce(mb)) * count for mb, count in zip(batches, counts)) / max(sum(counts), 1.0)

    def heldout_losses(self, count: int) -> dict[str, float]:
        groups = {"forget": self.cfg.data.labeling.forget_categories, "retain": self.cfg.data.retain_categories}
        return {name: self.mean_loss(batches) for name, cats in groups.items()
                if (batches := self.heldout(list(cats), count))}


def load_unlearning(checkpoint: str, data_path: str | None) -> Unlearning:
    """The checkpoint's model (any engine, layout, or model-only) and its forget/retain training documents."""
    from megatron_sgtm.export.source import open_source
    from megatron_sgtm.training.config import from_dict
    from megatron_sgtm.training.run_data import load_data

    source = open_source(Path(checkpoint), world=1)
    path, ckpt = source.path, source.native()
    raw = {**source.config, "model": dataclasses.asdict(ckpt.model)}
    if data_path:
        raw["data"] = {**raw.get("data", {}), "path": data_path}
    cfg = from_dict(raw, f"{path}/meta.json")
    if not cfg.data.path:
        raise UnlearnError(f"--checkpoint {path}: its meta.json names no training data; pass --data PATH")
    data = load_data(cfg)
    training = np.setdiff1d(np.arange(data.corpus.num_docs), data.heldout_docs)
    sets = {}
    for name, categories in (("forget", cfg.data.labeling.forget_categories), ("retain", cfg.data.retain_categories)):
        sets[name] = training[data.corpus.category_mask(list(categories))[training]]
        if not len(sets[name]):
            raise UnlearnError(f"--data {cfg.data.path}: no non-held-out documents of the {name} categories "
                               f"{list(categories)} (categories there: {data.corpus.category_names})")
    ckpt.module.train()  # dropout is 0 in our models; train mode only keeps autograd's usual path
    return Unlearning(path, ckpt, cfg, data, sets["forget"], sets["retain"])


def mlp_params(module: torch.nn.Module, layers: list[int], biases: bool) -> dict[str, torch.nn.Parameter]:
    """fc1/fc2 weights (and biases) of the MLPs of `layers`, by global name; every other parameter frozen."""
    wanted = {f"decoder.layers.{i}.mlp.linear_{fc}.{kind}" for i in layers for fc in ("fc1", "fc2")
              for kind in (("weight", "bias") if biases else ("weight",))}
    params = {}
    for name, param in module.named_parameters():
        param.requires_grad_(name in wanted)
        if name in wanted:
            params[name] = param
    return params


def check_layer(flag: str, index: int, num_layers: int) -> None:
    if not 0 <= index < num_layers:
        raise UnlearnError(f"{flag} {index}: out of range for this {num_layers}-layer model (0..{num_layers - 1})")


def first_tensor(output) -> torch.Tensor:
    """A megatron module's main output (layers and linears return tuples)."""
    return output[0] if isinstance(output, tuple) else output


def mlp_output(output) -> torch.Tensor:
    """An MLP's output with its bias (megatron hands fc2's bias to the caller to fuse)."""
    out, bias = output
    return out if bias is None else out + bias


@contextlib.contextmanager
def tapped(taps: dict[str, torch.nn.Module], stop: torch.nn.Module | None = None) -> Iterator[dict]:
    """Keep each tapped module's raw output (under its name) during the forward; stop after `stop`'s."""
    outputs: dict = {}

    def hook(name: str, is_stop: bool):
        def keep(_module, _inputs, output):
            outputs[name] = output
            if is_stop:
                raise _Stop
        return keep

    handles = [m.register_forward_hook(hook(n, m is stop)) for n, m in taps.items()]
    if stop is not None and all(m is not stop for m in taps.values()):
        handles.append(stop.register_forward_hook(hook("_stop", True)))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def original_weights(params: dict[str, torch.nn.Parameter], originals: dict[str, torch.Tensor]) -> Iterator[None]:
    """The frozen model for the duration: the updated parameters hold their starting values (no second copy
    of the model), and no gradient is taken."""
    current = {n: p.data for n, p in params.items()}
    try:
        with torch.no_grad():
            for name, param in params.items():
                param.data = originals[name]
            yield
    finally:
        for name, param in params.items():
            param.data = current[name]


def changed_names(state: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> list[str]:
    return sorted(n for n, t in before.items() if not torch.equal(state[n], t))


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def check_out(out: str) -> None:
    if Path(out).exists():
        raise UnlearnError(f"--out {out}: already exists (choose a new output directory)")


def write_result(source: Unlearning, out: str, method: str, settings: dict, params: dict[str, torch.nn.Parameter],
                 originals: dict[str, torch.Tensor], losses: dict) -> list[str]:
    """A model-only checkpoint of the unlearned model. It keeps the source's SGTM partition (an unlearned SGTM
    model can still be ablated) but not an `ablated` mark: the update may have written into Θ_F."""
    from megatron_sgtm.training.checkpoint import write_model_only

    meta = source.ckpt.meta
    changed = changed_names(source.ckpt.state, originals)
    keep = ("config", "partition", "method", "step")
    record = {"method": method, "source": str(source.path), "source_ablated": bool(meta.get("ablated", False)),
              "settings": settings, "trainable_params": sorted(params), "changed_params": changed, "losses": losses}
    new_meta = {**{k: meta[k] for k in keep if k in meta}, "source": meta.get("source", str(source.path)),
                "unlearning": record}
    tokenizer = [p for p in (source.path / TOKENIZER_FILE, Path(source.cfg.data.path) / TOKENIZER_FILE) if p.is_file()]
    write_model_only(Path(out), source.ckpt.state, new_meta, tokenizer[:1])
    return changed
