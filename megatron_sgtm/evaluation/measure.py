"""The paper's measurements through the training engine: per-category losses and bits per byte of the live,
ablated and calibrated model, per-token loss distributions (Fig. 6b) and absorption (Fig. 4b).

Every measurement is a collective over the world (any TP/PP/DP layout) and returns the same numbers on
every rank."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_sgtm.core.collectives import all_reduce_host
from megatron_sgtm.core.labels import TokenLabel
from megatron_sgtm.data.sampler import eval_batches
from megatron_sgtm.training.calibration import Settings, calibrated
from megatron_sgtm.training.config import TrainConfig
from megatron_sgtm.training.run_data import RunData, calibration_batches, evaluation_batches, evaluation_groups

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
MODELS = ("live", "ablated", "calibrated")


def say(text: str) -> None:
    if dist.get_rank() == 0:
        print(f"[eval] {text}", file=sys.stderr, flush=True)


def token_bytes(tokenizer_path) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens such as the end-of-document token): byte-level
    BPE tokens are one byte per character of their vocabulary string; other tokenizers decode each id."""
    from tokenizers import decoders

    from megatron_sgtm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
    out = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        if token not in special:
            out[index] = len(token) if byte_level else len(tokenizer.decode([index]).encode())
    return out


@dataclass
class Group:
    """One reported set of documents and this rank's share of its evaluation micro-batches."""

    name: str
    documents: int
    batches: list[dict]


def _bytes(batches: list[dict], per_token: np.ndarray, dp_group) -> float:
    found = torch.zeros(1, dtype=torch.float64)
    for mb in batches:
        targets = mb["targets"][mb["loss_mask"] > 0].numpy()
        found += float(per_token[np.minimum(targets, len(per_token) - 1)].sum())
    return float(all_reduce_host(found, group=dp_group))


def _summary(losses: list[torch.Tensor], num_bytes: float) -> tuple[dict, np.ndarray]:
    values = torch.cat(losses).double().numpy() if losses else np.zeros(0)
    total = float(values.sum())
    summary = {"loss": total / max(len(values), 1), "bits_per_byte": total / (math.log(2) * max(num_bytes, 1.0)),
               "quantiles": {f"p{round(q * 100):02d}": float(np.quantile(values, q)) if len(values) else math.nan
                             for q in QUANTILES}}
    return summary, values.astype(np.float32)


def losses(engine, cfg: TrainConfig, data: RunData, groups: list[Group], per_token_bytes: np.ndarray,
           ablate: bool, calibrate: bool) -> tuple[dict, dict, list[float]]:
    """(per group: documents, tokens, bytes and per model the loss, bits per byte and quantiles; per group and
    model the per-token losses; the calibration's objective per step). Models: live, ablated (when `ablate`)
    and calibrated (the ablated model, or the live one without `ablate`, with the paper's output bias)."""
    results: dict = {}
    values: dict = {}
    for group in groups:
        num_bytes = _bytes(group.batches, per_token_bytes, engine.dp_group)
        results[group.name] = {"documents": group.documents, "bytes": num_bytes}
        for model in ("live", "ablated") if ablate else ("live",):
            say(f"{group.name}: {model} model")
            found = engine.token_losses(group.batches, ablate=model == "ablated")
            results[group.name][model], values[(group.name, model)] = _summary(found, num_bytes)
        results[group.name]["tokens"] = int(len(values[(group.name, "live")]))
    history: list[float] = []
    if calibrate:
        settings = Settings.of(cfg)
        say(f"calibrating the {'ablated' if ablate else 'live'} model ({settings.steps} AdamW steps)")
        with calibrated(engine, calibration_batches(cfg, engine, data), settings, ablate=ablate) as calibration:
            history = _everywhere(calibration.history)
            for group in groups:
                found = engine.token_losses(group.batches, ablate=ablate)
                results[group.name]["calibrated"], values[(group.name, "calibrated")] = _summary(
                    found, results[group.name]["bytes"])
    return results, values, history


def _everywhere(history: list[float]) -> list[float]:
    """The fit's objective (known on the last pipeline stage) on every rank."""
    shares: list = [None] * dist.get_world_size()
    dist.all_gather_object(shares, history)
    return max(shares, key=len)


def absorption_groups(cfg: TrainConfig, data: RunData) -> dict[str, np.ndarray]:
    """Held-out documents by (true category, label): the paper's Fig. 4b groups."""
    corpus, labels, docs = data.corpus, data.doc_labels, data.heldout_docs
    forget = corpus.category_mask(cfg.data.labeling.forget_categories)[docs]
    retain = corpus.category_mask(cfg.data.retain_categories)[docs]
    adjacent = corpus.category_mask(cfg.data.adjacent_categories)[docs]
    label = labels[docs]
    return {
        "forget_labelled_F": docs[forget & (label == TokenLabel.FORGET)],
        "forget_undiscovered_U": docs[forget & (label == TokenLabel.UNLABELED)],
        "retain_labelled_R": docs[retain & (label == TokenLabel.RETAIN)],
        "retain_labelled_U": docs[retain & (label == TokenLabel.UNLABELED)],
        "adjacent": docs[adjacent],
    }


def absorption(engine, cfg: TrainConfig, data: RunData, max_docs: int) -> dict[str, dict[str, list[float]]]:
    """Per group, ‖∇Θ_F‖/‖Θ_F‖ and ‖∇Θ_R‖/‖Θ_R‖ of the live model (no labels) for each of its first `max_docs`
    held-out documents, the gradient of the document's mean token loss over its first micro-batch."""
    out: dict[str, dict[str, list[float]]] = {}
    for name, docs in absorption_groups(cfg, data).items():
        docs = docs[:max_docs]
        say(f"absorption: {name} ({len(docs)} documents)")
        out[name] = {"forget": [], "retain": []}
        for doc in docs:
            mb = next(eval_batches(data.corpus, np.asarray([doc]), data.doc_labels, seq_length=cfg.model.seq_length,
                                   micro_batch_size=cfg.optim.micro_batch_size))
            forget, retain = engine.relative_grad_norms(mb)
            out[name]["forget"].append(forget)
            out[name]["retain"].append(retain)
    return out


def heldout_groups(cfg: TrainConfig, engine, data: RunData, categories: list[str] | None) -> list[Group]:
    """forget, retain, adjacent and each other category of the data (or those of `categories`), over the
    evaluated documents (`data.heldout_docs`); empty groups are left out."""
    corpus, docs = data.corpus, data.heldout_docs
    sets = evaluation_groups(cfg)
    grouped = {c for cats in sets.values() for c in cats}
    extra = categories if categories is not None else [c for c in corpus.category_names if c not in grouped]
    sets.update({f"category:{c}": (c,) for c in extra})
    groups = []
    for name, cats in sets.items():
        chosen = docs[corpus.category_mask(list(cats))[docs]]
        batches = evaluation_batches(cfg, engine, data, chosen)
        if batches:
            groups.append(Group(name, len(chosen), batches))
    return groups
