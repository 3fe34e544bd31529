"""A run's data: corpus -> labels -> held-out split -> the training documents it keeps, and the micro-batches
every consumer draws from them (the training sampler, evaluation groups, calibration batches, token counts).

`train`, `eval`, `unlearn` and the attack all read a run's data through `load_data`, so the held-out split
and the filters are recomputed the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from megatron_sgtm.core.collectives import all_reduce_host
from megatron_sgtm.core.labels import TokenLabel
from megatron_sgtm.data.corpus import Corpus, heldout_split, load_corpus
from megatron_sgtm.data.indexed import IndexedSampler, LabelledGPTDataset
from megatron_sgtm.data.labeling import label_corpus
from megatron_sgtm.data.sampler import SGTMSampler, eval_batches, mixture_pools
from megatron_sgtm.training.config import ConfigError, TrainConfig, mixture_groups

if TYPE_CHECKING:
    from megatron_sgtm.training.engine import Engine

_KEEP_FORGET_SEED = 12  # the random stream of data.forget_keep_fraction (train.seed first)


@dataclass
class RunData:
    corpus: Corpus
    doc_labels: np.ndarray
    train_docs: np.ndarray
    heldout_docs: np.ndarray
    train_sequences: np.ndarray | None = None  # indexed data: the index's sequences the GPTDataset trains on


def load_data(cfg: TrainConfig) -> RunData:
    d = cfg.data
    if d.indexed_prefix:
        return _load_indexed(cfg)
    corpus = load_corpus(Path(d.path), require_scores=d.labeling.score_source == "tagged",
                         skip_bad_shards=d.skip_bad_shards)
    if corpus.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's tokenizer "
                         f"({corpus.vocab_size} tokens, {d.path})")
    doc_labels = label_corpus(corpus, d.labeling)
    train_docs, heldout_docs = heldout_split(corpus, d.heldout_fraction, seed=cfg.train.seed)
    return RunData(corpus, doc_labels, training_documents(cfg, corpus, doc_labels, train_docs), heldout_docs)


def _load_indexed(cfg: TrainConfig) -> RunData:
    """An indexed dataset and its sidecar: documents of megatron's valid split are held out, those of its train
    split (less the forget-keep fraction and a filter's choice) are trained on, through their sequences."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    from megatron_sgtm.data.indexed import document_of_sequence, indexed_corpus, open_index, read_labels

    d = cfg.data
    labels = read_labels(d.indexed_prefix, d.indexed_labels)
    corpus = indexed_corpus(d.indexed_prefix, labels, d.eod_id, cfg.model.vocab_size)
    doc_labels = labels.labels(d.labeling)
    index = open_index(d.indexed_prefix)
    owner = document_of_sequence(index)
    # the sequence ranges of megatron's BlendedMegatronDatasetBuilder for this split string
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(d.indexed_split))
    (train_start, train_end), (valid_start, valid_end) = (
        (round(pair[0] * len(index)), round(pair[1] * len(index))) if pair else (0, 0) for pair in matrix[:2])
    train_docs = np.unique(owner[train_start:train_end])
    heldout_docs = np.setdiff1d(np.unique(owner[valid_start:valid_end]), train_docs)
    kept = training_documents(cfg, corpus, doc_labels, train_docs)
    sequences = np.arange(train_start, train_end, dtype=np.int32)
    return RunData(corpus, doc_labels, kept, heldout_docs, sequences[np.isin(owner[sequences], kept)])


def _keep_forget(cfg: TrainConfig, corpus: Corpus, docs: np.ndarray) -> np.ndarray:
    """`docs` less a seeded share 1 - data.forget_keep_fraction of its ground-truth forget documents (all kept at
    1.0), in their order: the leakage grid varies how many forget tokens a run sees."""
    fraction = cfg.data.forget_keep_fraction
    if fraction >= 1.0:
        return docs
    forget = docs[corpus.category_mask(cfg.data.labeling.forget_categories)[docs]]
    order = np.random.default_rng([cfg.train.seed, _KEEP_FORGET_SEED]).permutation(len(forget))
    dropped = forget[order[round(len(forget) * fraction):]]
    return docs[~np.isin(docs, dropped)]


def training_documents(cfg: TrainConfig, corpus: Corpus, doc_labels: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """The training documents a run keeps: `data.forget_keep_fraction` of the forget ones, then each data-filtering
    baseline's choice."""
    docs = _keep_forget(cfg, corpus, docs)
    kind = cfg.data_filter
    if kind == "none":
        return docs
    if kind == "oracle":  # perfect filter: the ground truth, not the classifier
        drop = corpus.category_mask(cfg.data.labeling.forget_categories)
    else:
        drop = doc_labels == TokenLabel.FORGET
        if kind == "strict":
            drop = drop | corpus.category_mask(cfg.data.adjacent_categories)
    return docs[~drop[docs]]


TOKEN_GROUPS = ("forget", "forget_undiscovered", "forget_labelled", "retain", "adjacent", "total")


class TokenCounts:
    """Tokens the run trained on per document group (summary.json's ``train_tokens``), counted exactly: each step's
    loss-bearing positions (``loss_mask > 0``) by the document they belong to (``doc_ids``). ``forget`` is the
    ground-truth forget categories, ``forget_labelled`` those of its documents labelled F and ``forget_undiscovered``
    the others, the ones the labels missed (U, or R where the classifier scored them as retain: the weak filter
    keeps both, SGTM confines neither to the forget partition); ``retain`` and ``adjacent`` their categories;
    ``total`` every one. Each rank counts the micro-batches it
    trains on; `totals` sums them over the data-parallel group (the other ranks of a DP rank hold the same ones)."""

    def __init__(self, cfg: TrainConfig, data: RunData, saved: dict | None = None):
        corpus, labels = data.corpus, data.doc_labels
        forget = corpus.category_mask(cfg.data.labeling.forget_categories)
        members = (forget, forget & (labels != TokenLabel.FORGET), forget & (labels == TokenLabel.FORGET),
                   corpus.category_mask(cfg.data.retain_categories), corpus.category_mask(cfg.data.adjacent_categories),
                   np.ones(corpus.num_docs, dtype=bool))
        self._flags = sum(m.astype(np.uint8) << i for i, m in enumerate(members))  # bit i: the document is in group i
        self._bits = np.uint8(1) << np.arange(len(TOKEN_GROUPS), dtype=np.uint8)
        self._saved = np.array([(saved or {}).get(g, 0) for g in TOKEN_GROUPS], dtype=np.int64)  # before a resume
        self._local = np.zeros(len(TOKEN_GROUPS), dtype=np.int64)

    def add(self, batches: list[dict]) -> None:
        for mb in batches:
            flags = self._flags[mb["doc_ids"][mb["loss_mask"] > 0].numpy()]
            self._local += ((flags[:, None] & self._bits) != 0).sum(0)

    def local(self) -> dict[str, int]:
        """This rank's counts since the run (or its resume) started."""
        return dict(zip(TOKEN_GROUPS, self._local.tolist()))

    def totals(self, engine: Engine) -> dict[str, int]:
        """Collective over the data-parallel group: the run's counts so far, checkpoints it resumed from included."""
        counts = all_reduce_host(torch.from_numpy(self._local.copy()), group=engine.dp_group)
        return dict(zip(TOKEN_GROUPS, (self._saved + counts.numpy()).tolist()))


def training_sampler(cfg: TrainConfig, data: RunData, dp_rank: int, dp_size: int) -> SGTMSampler | IndexedSampler:
    """The run's training stream (this data-parallel rank's share), resumable from a checkpoint's state
    (collective with indexed data: rank 0 builds megatron's sample indices first)."""
    if cfg.data.indexed_prefix:
        return IndexedSampler(indexed_training_dataset(cfg, data), micro_batch_size=cfg.optim.micro_batch_size,
                              global_batch_size=cfg.optim.global_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    return SGTMSampler(
        data.corpus, data.doc_labels, seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.optim.micro_batch_size, global_batch_size=cfg.optim.global_batch_size,
        dp_rank=dp_rank, dp_size=dp_size, seed=cfg.train.seed, mode=cfg.data.mode, documents=data.train_docs,
        mixture=mixture_pools(data.corpus, data.train_docs, mixture_groups(cfg), cfg.data.mixture)
        if cfg.data.mixture else None,
    )


def indexed_training_dataset(cfg: TrainConfig, data: RunData) -> LabelledGPTDataset:
    """The LabelledGPTDataset of the training sequences, train.train_steps global batches long: what megatron's
    BlendedMegatronDatasetBuilder builds for the train split (when nothing is filtered). Its sample indices are
    cached under logging.run_dir; rank 0 writes them before the other ranks read them."""
    from megatron.core.datasets.utils import Split

    from megatron_sgtm.data.indexed import LabelledGPTDatasetConfig, open_index

    d = cfg.data
    config = LabelledGPTDatasetConfig(
        random_seed=cfg.train.seed, sequence_length=cfg.model.seq_length, split=d.indexed_split,
        path_to_cache=str(Path(cfg.logging.run_dir) / "indexed_cache"), tokenizer=IndexTokens(d.eod_id,
                                                                                              cfg.model.vocab_size),
        reset_position_ids=d.document_attention, reset_attention_mask=d.document_attention,
        eod_mask_loss=d.document_attention, create_attention_mask=False, labeling=d.labeling,
        label_files={d.indexed_prefix: d.indexed_labels} if d.indexed_labels else None)
    num_samples = max(cfg.train.train_steps, 1) * cfg.optim.global_batch_size

    def build() -> LabelledGPTDataset:
        return LabelledGPTDataset(open_index(d.indexed_prefix), d.indexed_prefix, data.train_sequences, num_samples,
                                  Split.train, config)

    first = not dist.is_initialized() or dist.get_rank() == 0
    dataset = build() if first else None
    if dist.is_initialized():
        dist.barrier()
    return dataset if first else build()


@dataclass(frozen=True)
class IndexTokens:
    """What megatron's GPTDataset reads of a tokenizer: the end-of-document id and the vocabulary size."""

    eod: int
    vocab_size: int

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "IndexTokens", "eod": self.eod, "vocab_size": self.vocab_size}


def evaluation_batches(cfg: TrainConfig, engine: Engine, data: RunData, docs: np.ndarray) -> list[dict]:
    """This rank's share of the first `train.eval_batches` micro-batches over `docs` (all with 0): the same
    sequences at every layout, the same count on every rank (`eval_batches` pads)."""
    return list(eval_batches(data.corpus, docs, data.doc_labels, seq_length=cfg.model.seq_length,
                             micro_batch_size=cfg.optim.micro_batch_size, dp_rank=engine.dp_rank,
                             dp_size=engine.dp_size, limit=cfg.train.eval_batches or None))


def evaluation_groups(cfg: TrainConfig) -> dict[str, tuple[str, ...]]:
    """The categories of each reported group."""
    return {"forget": tuple(cfg.data.labeling.forget_categories), "retain": tuple(cfg.data.retain_categories),
            "adjacent": tuple(cfg.data.adjacent_categories)}


def heldout_batches(cfg: TrainConfig, engine: Engine, data: RunData) -> dict[str, list[dict]]:
    """This rank's evaluation micro-batches of each group's held-out documents; empty groups left out."""
    docs = data.heldout_docs
    held_out = {name: evaluation_batches(cfg, engine, data, docs[data.corpus.category_mask(cats)[docs]])
                for name, cats in evaluation_groups(cfg).items()}
    return {name: batches for name, batches in held_out.items() if batches}


def calibration_batches(cfg: TrainConfig, engine: Engine, data: RunData) -> dict[str, list[dict]]:
    """This rank's share of `train.eval_batches` micro-batches of each group's training (not held-out)
    documents, before any data filter: what the calibration fits on, whatever the method trained on."""
    training = np.setdiff1d(np.arange(data.corpus.num_docs), data.heldout_docs)
    return {name: evaluation_batches(cfg, engine, data, training[data.corpus.category_mask(cats)[training]])
            for name, cats in evaluation_groups(cfg).items()}
