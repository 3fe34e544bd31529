"""The SGTM sampler: packed sequences with per-token labels, split over data-parallel ranks.

Layout. Each epoch a pool of documents is shuffled (seeded by ``(seed, pool, epoch)``) and
concatenated into one token stream, which is cut into sequences of ``seq_length`` inputs (plus one
target token). Global step ``g`` takes ``global_batch_size`` consecutive sequences of one pool;
DP rank ``r`` gets the ``r``-th contiguous block of ``global_batch_size / dp_size`` of them, cut
into micro-batches of ``micro_batch_size``. The tail of an epoch is padded (``loss_mask`` 0), so
every token of every document is delivered exactly once per epoch.

Modes. ``packed``: one pool with every document. ``batch_uniform`` (the paper's schedule): two
pools, F-labelled documents ("forget") and R/U-labelled ones ("other"); each global step draws
one pool, in stratified blocks of 1000 steps that reproduce each pool's share of tokens, so both
run through their documents at the same pace. ``mixture`` (any mode's documents, split into named
pools with given token shares, e.g. the fine-tuning attack's 50/50 forget/retain): every global step
holds sequences of every pool in those shares (largest remainders carried from step to step, so the
cumulative counts are exact), each pool cycling through its own shuffled epochs at its own pace.

Pipeline stages. A micro-batch is a pure function of ``(step, micro)`` and the constructor
arguments: every pipeline stage of a DP rank builds the same sampler and iterates it (or calls
`micro_batch` directly) and gets identical tokens and labels, with nothing to communicate.

Elastic resume. Global step ``g`` holds the same sequences at every DP size and micro-batch size,
so a saved position (``state_dict``: the global step) continues the same stream at another DP size
(as Megatron-LM's consumed samples do); only the global batch size, the data, labels, mode and
seed must stay (`SGTMSampler.check_resumable`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from megatron_sgtm.core.labels import TokenLabel
from megatron_sgtm.data.corpus import Corpus
from megatron_sgtm.errors import UserError

MODES = ("packed", "batch_uniform")
SCHEDULE_BLOCK = 1000
_POOL_SEED, _SCHEDULE_SEED = 10, 11


class MixtureError(UserError, ValueError):
    """A `data.mixture` pool that selects no training documents."""


def mixture_pools(corpus: Corpus, documents: np.ndarray, groups: Mapping[str, list[str] | tuple[str, ...]],
                  shares: Mapping[str, float]) -> dict[str, tuple[np.ndarray, float]]:
    """``{pool: (documents, token share)}`` of a ``data.mixture``: each key is a group of `groups` (its
    ground-truth categories) or else one category name; the pool is that part of `documents`."""
    pools = {}
    for name, share in shares.items():
        categories = list(groups.get(name, [name]))
        docs = documents[corpus.category_mask(categories)[documents]]
        if not len(docs) or not corpus.lengths[docs].sum():
            raise MixtureError(f"data.mixture: pool {name!r} (categories {categories}) holds no training documents")
        pools[name] = (docs, float(share))
    return pools


class PackedStream:
    """A pool of documents concatenated in a per-epoch order and read as windows of ``seq_length + 1``
    tokens."""

    def __init__(self, corpus: Corpus, documents: np.ndarray, seq_length: int, seed: tuple[int, ...] | None):
        self.corpus, self.documents, self.seq_length, self.seed = corpus, documents, seq_length, seed
        self.num_tokens = int(corpus.lengths[documents].sum())
        self.num_sequences = math.ceil(self.num_tokens / seq_length)
        self._epoch, self._order, self._cum = -1, documents, np.zeros(1, np.int64)

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Document order of ``epoch`` (the given order when unseeded) and its cumulative token counts."""
        if epoch != self._epoch:
            order = self.documents
            if self.seed is not None:
                order = self.documents[np.random.default_rng([*self.seed, epoch]).permutation(len(self.documents))]
            cum = np.zeros(len(order) + 1, dtype=np.int64)
            np.cumsum(self.corpus.lengths[order], out=cum[1:])
            self._epoch, self._order, self._cum = epoch, order, cum
        return self._order, self._cum

    def sequences(self, epoch: int, indices: np.ndarray, doc_labels: np.ndarray) -> dict[str, np.ndarray]:
        order, cum = self._layout(epoch)
        s = self.seq_length
        pos = indices[:, None] * s + np.arange(s + 1)
        valid = pos < self.num_tokens
        pos = np.where(valid, pos, 0)
        unit = np.searchsorted(cum, pos, side="right") - 1
        offset = pos - cum[unit]
        doc = order[unit]
        tokens = self.corpus.tokens[self.corpus.offsets[doc] + offset].astype(np.int64)
        tokens[~valid] = self.corpus.eod_id
        inputs_valid = valid[:, :-1]
        # A target counts only inside the input's own document: this masks the end-of-document
        # position (whose target is the next document's first token) and the padding.
        loss_mask = inputs_valid & valid[:, 1:] & (unit[:, :-1] == unit[:, 1:])
        doc_ids = np.where(inputs_valid, doc[:, :-1], -1)
        doc_offsets = np.where(inputs_valid, offset[:, :-1], -1)
        token_labels = np.where(inputs_valid, doc_labels[doc[:, :-1]], TokenLabel.UNLABELED).astype(np.uint8)
        return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "token_labels": token_labels,
                "loss_mask": loss_mask.astype(np.float32), "position_ids": _position_ids(doc_ids, doc_offsets),
                "doc_ids": doc_ids, "doc_offsets": doc_offsets}


def _position_ids(doc_ids: np.ndarray, doc_offsets: np.ndarray) -> np.ndarray:
    """Positions restart at every document start, at the start of a row, and where padding begins."""
    start = doc_offsets == 0
    start[:, 0] = True
    start[:, 1:] |= doc_ids[:, 1:] != doc_ids[:, :-1]
    index = np.broadcast_to(np.arange(doc_ids.shape[1]), doc_ids.shape)
    return index - np.maximum.accumulate(np.where(start, index, 0), axis=1)


def _to_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}


class _MixtureLayout:
    """Which pool and which of its sequences fill each position of a global step, by random access: pool
    ``i`` owns positions ``[floor(g*B*S_i), floor(g*B*S_{i+1}))`` of the first ``g*B`` sequences overall
    (``S`` the cumulative shares, ``B`` the global batch size)."""

    def __init__(self, shares: list[float], global_batch_size: int):
        cumulative = np.concatenate([[0.0], np.cumsum(shares) / sum(shares)])
        cumulative[-1] = 1.0
        self.cumulative, self.global_batch_size = cumulative, global_batch_size

    def _before(self, step: int) -> np.ndarray:
        """Sequences of each pool in the steps before `step` (cumulative, exact up to rounding)."""
        return np.floor(step * self.global_batch_size * self.cumulative + 1e-9).astype(np.int64)

    def locate(self, step: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pool, the pool's sequence number) of each position of global step `step`."""
        start, end = self._before(step), self._before(step + 1)
        counts = np.diff(end) - np.diff(start)  # this step's sequences of each pool
        first = np.concatenate([[0], np.cumsum(counts)])
        pool = np.searchsorted(first, positions, side="right") - 1
        return pool, np.diff(start)[pool] + positions - first[pool]


class _StepSchedule:
    """Which pool each global step reads, and that pool's own step counter, by random access."""

    def __init__(self, proportions: list[float], seed: int):
        exact = np.asarray(proportions) / sum(proportions) * SCHEDULE_BLOCK
        counts = np.floor(exact).astype(np.int64)
        counts[np.argsort(counts - exact)[: SCHEDULE_BLOCK - counts.sum()]] += 1  # largest remainders
        self.counts, self.seed = counts, seed
        self._block, self._pools, self._rank = -1, np.zeros(0, np.int64), np.zeros(0, np.int64)

    def locate(self, step: int) -> tuple[int, int]:
        block, within = divmod(step, SCHEDULE_BLOCK)
        if block != self._block:
            pools = np.repeat(np.arange(len(self.counts)), self.counts)
            pools = pools[np.random.default_rng([self.seed, _SCHEDULE_SEED, block]).permutation(SCHEDULE_BLOCK)]
            rank = np.zeros(SCHEDULE_BLOCK, dtype=np.int64)
            for p in range(len(self.counts)):
                rank[pools == p] = np.arange(self.counts[p])
            self._block, self._pools, self._rank = block, pools, rank
        pool = int(self._pools[within])
        return pool, block * int(self.counts[pool]) + int(self._rank[within])


class MicroBatchStream:
    """A DP rank's endless stream of micro-batches addressed by (global step, micro-batch of the step): what
    the trainer iterates, and the position a resumed stream starts from. A subclass sets `num_micro_batches`,
    `step` and `micro` and defines `micro_batch(step, micro)`."""

    num_micro_batches: int
    step: int
    micro: int

    def micro_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.micro_batch(self.step, self.micro)
        self.micro += 1
        if self.micro == self.num_micro_batches:
            self.step, self.micro = self.step + 1, 0
        return batch


class SGTMSampler(MicroBatchStream):
    """Iterator of micro-batches (dicts of torch tensors) for one data-parallel rank.

    Keys: ``tokens``/``targets`` [b, s] int64 (inputs and next-token targets); ``token_labels``
    [b, s] uint8, the SGTM label (`megatron_sgtm.core.labels`) of the document each position belongs to;
    ``loss_mask`` [b, s] float32; ``position_ids`` [b, s], restarting at document starts (feed them
    to `batch_geometry.document_attention_mask`); ``doc_ids``/``doc_offsets`` [b, s], the corpus index and offset
    of each input token (-1 for padding). Positions with ``loss_mask`` 0 carry no gradient, so
    trainers must count labels (for step gating) only where ``loss_mask > 0``.
    """

    def __init__(self, corpus: Corpus, doc_labels: np.ndarray, *, seq_length: int, micro_batch_size: int,
                 global_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, mode: str = "packed",
                 documents: np.ndarray | None = None, mixture: Mapping[str, tuple[np.ndarray, float]] | None = None):
        """`mixture` (from `mixture_pools`) replaces the mode's pools: named pools of documents with the
        token share each gets in every global step."""
        if mode not in MODES:
            raise ValueError(f"sampler mode must be one of {MODES}, got {mode!r}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        if seq_length < 1 or micro_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global_batch_size {global_batch_size} must be a multiple of micro_batch_size "
                             f"{micro_batch_size} x dp_size {dp_size} (and seq_length {seq_length} >= 1)")
        if len(doc_labels) != corpus.num_docs:
            raise ValueError(f"{len(doc_labels)} labels for {corpus.num_docs} documents")
        self.corpus, self.doc_labels, self.mode = corpus, np.asarray(doc_labels, np.uint8), mode
        self.seq_length, self.micro_batch_size, self.global_batch_size = seq_length, micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.num_micro_batches = global_batch_size // (micro_batch_size * dp_size)
        documents = np.arange(corpus.num_docs) if documents is None else np.asarray(documents, np.int64)
        if mixture:
            if any(share <= 0 for _, share in mixture.values()):
                raise ValueError(f"mixture shares must be > 0, got { {k: v for k, (_, v) in mixture.items()} }")
            pools = {name: np.asarray(docs, np.int64) for name, (docs, _) in mixture.items()}
        elif mode == "packed":
            pools = {"all": documents}
        else:
            is_forget = self.doc_labels[documents] == TokenLabel.FORGET
            pools = {"forget": documents[is_forget], "other": documents[~is_forget]}
        self.pool_names = list(pools)
        self.streams = [PackedStream(corpus, pool, seq_length, seed=(seed, _POOL_SEED, i))
                        for i, pool in enumerate(pools.values())]
        total = sum(s.num_tokens for s in self.streams)
        if total == 0:
            raise ValueError("the sampler's documents hold no tokens")
        self.mixture = _MixtureLayout([share for _, share in mixture.values()], global_batch_size) if mixture else None
        if self.mixture is not None:
            self.proportions = [float(x) for x in np.diff(self.mixture.cumulative)]
        else:
            self.proportions = [s.num_tokens / total for s in self.streams]  # pools advance at the same pace
        self.schedule = _StepSchedule(self.proportions, seed)
        self.step, self.micro = 0, 0

    def steps_per_epoch(self, pool: str | None = None) -> int:
        """Global steps of ``pool`` (default: the only pool, in packed mode) that cover it once."""
        stream = self.streams[self.pool_names.index(pool or self.pool_names[0])]
        return math.ceil(stream.num_sequences / self.global_batch_size)

    def step_pool(self, step: int) -> str:
        return self.pool_names[self.schedule.locate(step)[0]]

    def micro_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``micro`` of global step ``step`` for this rank (a pure function)."""
        if self.mixture is not None:
            return self._mixture_batch(step, micro)
        pool, pool_step = self.schedule.locate(step)
        epoch, step_in_epoch = divmod(pool_step, self.steps_per_epoch(self.pool_names[pool]))
        first = (step_in_epoch * self.global_batch_size
                 + self.dp_rank * (self.global_batch_size // self.dp_size) + micro * self.micro_batch_size)
        indices = np.arange(first, first + self.micro_batch_size)
        return _to_torch(self.streams[pool].sequences(epoch, indices, self.doc_labels))

    def _mixture_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        first = self.dp_rank * (self.global_batch_size // self.dp_size) + micro * self.micro_batch_size
        pools, numbers = self.mixture.locate(step, np.arange(first, first + self.micro_batch_size))
        rows: list[dict[str, np.ndarray]] = []
        for pool, number in zip(pools, numbers):  # a handful of rows: one gather each
            stream = self.streams[pool]
            epoch, index = divmod(int(number), stream.num_sequences)
            rows.append(stream.sequences(epoch, np.array([index]), self.doc_labels))
        return _to_torch({key: np.concatenate([row[key] for row in rows]) for key in rows[0]})

    def _fingerprint(self) -> str:
        """Everything that determines the global batch sequence except the position: not the DP rank or
        size, nor the micro-batch size, which only cut each global batch differently (elastic resume)."""
        labels = hashlib.sha256(self.doc_labels.tobytes()).hexdigest()
        documents = [hashlib.sha256(s.documents.tobytes()).hexdigest() for s in self.streams]
        key = [self.mode, self.seed, self.seq_length, self.global_batch_size, self.corpus.num_docs,
               int(self.corpus.offsets[-1]), labels, documents, self.proportions]
        if self.mixture is not None:
            key.append(self.pool_names)
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()

    def state_dict(self) -> dict:
        return {"step": self.step, "micro": self.micro, "fingerprint": self._fingerprint(),
                "global_batch_size": self.global_batch_size, "dp_size": self.dp_size,
                "micro_batch_size": self.micro_batch_size}

    def check_resumable(self, state: Mapping) -> None:
        """Raise ValueError unless `state` continues this global stream. The position is counted in
        global steps, so the global batch size must stay; DP size and micro-batch size may change at a
        step boundary (each global step holds the same sequences, only dealt out differently)."""
        saved_gbs = state.get("global_batch_size", self.global_batch_size)
        if saved_gbs != self.global_batch_size:
            raise ValueError(f"optim.global_batch_size={self.global_batch_size}, but the checkpoint was saved with "
                             f"{saved_gbs}; its position is counted in global steps of that size, so keep it")
        if state["fingerprint"] != self._fingerprint():
            raise ValueError("sampler state was saved with different data, labels or batch settings; "
                             "resuming would not continue the same sequence of batches")
        cut = (state.get("dp_size"), state.get("micro_batch_size"))
        if state["micro"] and cut != (self.dp_size, self.micro_batch_size):
            raise ValueError(f"sampler state stopped inside global step {state['step']} at DP size x micro-batch "
                             f"size {cut[0]} x {cut[1]}; it resumes only at that layout, not at "
                             f"{self.dp_size} x {self.micro_batch_size}")

    def load_state_dict(self, state: Mapping) -> None:
        self.check_resumable(state)
        self.step, self.micro = int(state["step"]), int(state["micro"])


def eval_batches(corpus: Corpus, documents: np.ndarray, doc_labels: np.ndarray, *, seq_length: int,
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """One deterministic pass over ``documents`` in order (no shuffling), its first `limit` micro-batches (all
    without) dealt to the DP ranks in turn; for held-out evaluation streams. Every rank yields the same count: a
    rank the pass leaves one short gets a micro-batch of padding (no loss-bearing token), so every DP size
    evaluates the same sequences."""
    stream = PackedStream(corpus, np.asarray(documents, np.int64), seq_length, seed=None)
    blocks = math.ceil(stream.num_sequences / micro_batch_size)
    blocks = blocks if limit is None else min(blocks, limit)
    for block in range(dp_rank, math.ceil(blocks / dp_size) * dp_size, dp_size):
        first = block * micro_batch_size if block < blocks else stream.num_sequences  # past the end: padding
        yield _to_torch(stream.sequences(0, np.arange(first, first + micro_batch_size), doc_labels))
