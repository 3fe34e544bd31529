"""Labelled Megatron indexed datasets (the ``.bin/.idx`` of Megatron-LM's ``preprocess_data.py``).

An index holds no labels, so `tag_index` writes a sidecar beside it: ``<prefix>.sgtm_labels.npz`` (per-document
P(forget) scores and ground-truth category codes) and ``<prefix>.sgtm_labels.json`` (its header: the index's
document count and the SHA-256 of its ``.idx``, the npz's SHA-256, the category names, the classifier). The header
ties the sidecar to that very index: read against another index, or a rewritten one, it is refused.

`LabelledGPTDataset` is megatron-core's `GPTDataset` (built directly or by `BlendedMegatronDatasetBuilder`) that also
yields ``token_labels`` (each input token's document label, drawn by `label_documents` from the sidecar's scores with
the `LabelingConfig` knobs) and ``doc_ids`` (each input token's document, -1 for padding). A document is an entry of
the index's ``document_indices`` (one or more sequences); a GPTDataset sample spans several of them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path

from megatron_sgtm.core.labels import TokenLabel
from megatron_sgtm.data.corpus import Corpus
from megatron_sgtm.data.labeling import LabelingConfig, label_documents
from megatron_sgtm.data.sampler import MicroBatchStream
from megatron_sgtm.data.shards import sha256_file
from megatron_sgtm.errors import UserError

SIDECAR_SUFFIX = ".sgtm_labels"
FORMAT = "megatron-sgtm-indexed-labels/1"
NO_CATEGORY = -1
TAG_BATCH = 256
PROGRESS_EVERY_S = 10.0


class IndexedLabelsError(UserError, ValueError):
    """An index or its label sidecar is missing, unreadable or does not belong to it; the message names the file."""


def sidecar_path(prefix: str | Path) -> Path:
    """The default sidecar of an index: ``<prefix>.sgtm_labels`` (``.json`` / ``.npz`` added)."""
    return Path(str(prefix) + SIDECAR_SUFFIX)


def open_index(prefix: str | Path) -> IndexedDataset:
    """megatron-core's reader of ``prefix.idx/.bin``; a missing file is one line naming it, not an assert."""
    for path in (get_idx_path(str(prefix)), get_bin_path(str(prefix))):
        if not os.path.isfile(path):
            raise IndexedLabelsError(f"indexed dataset {prefix}: {path} does not exist")
    try:
        return IndexedDataset(str(prefix), mmap=True)
    except (AssertionError, ValueError, OSError) as err:
        raise IndexedLabelsError(f"indexed dataset {prefix}: unreadable index {get_idx_path(str(prefix))} "
                                 f"({err or type(err).__name__})") from err


def num_documents(index: IndexedDataset) -> int:
    return len(index.document_indices) - 1


def document_of_sequence(index: IndexedDataset) -> np.ndarray:
    """The document each sequence of the index belongs to (GPTDataset's "document ids" are sequence ids)."""
    return np.repeat(np.arange(num_documents(index)), np.diff(index.document_indices))


@dataclass
class DocumentLabels:
    """A sidecar's content: per-document scores and ground-truth category codes (`NO_CATEGORY` where unknown)."""

    scores: np.ndarray
    categories: np.ndarray
    category_names: list[str]
    header: dict

    @property
    def num_documents(self) -> int:
        return len(self.scores)

    def has_truth(self) -> bool:
        return bool(self.num_documents) and bool((self.categories != NO_CATEGORY).all())

    def category_mask(self, names: Sequence[str]) -> np.ndarray:
        codes = [self.category_names.index(n) for n in names if n in self.category_names]
        return np.isin(self.categories, codes)

    def labels(self, config: LabelingConfig) -> np.ndarray:
        """uint8 SGTM label per document: `label_documents` on the scores (or, with score_source=truth, on the
        categories), the ground truth driving the undiscovered / false-positive knobs."""
        is_forget = None
        if config.needs_truth:
            if not self.has_truth():
                raise IndexedLabelsError(
                    f"{self.header.get('path', 'label sidecar')}: labeling with score_source={config.score_source}, "
                    f"undiscovered_rate={config.undiscovered_rate}, false_positive_rate={config.false_positive_rate} "
                    "needs a ground-truth category for every document; tag with --categories FILE")
            is_forget = self.category_mask(config.forget_categories)
        scores = is_forget.astype(np.float64) if config.score_source == "truth" else self.scores
        return label_documents(scores, config, is_forget)


def write_labels(prefix: str | Path, out: Path, scores: np.ndarray, categories: Sequence[str | None],
                 classifier: dict) -> DocumentLabels:
    """Write ``out.npz`` then ``out.json`` (each complete or absent: written aside and renamed); the header, last,
    records the npz's digest, so a sidecar whose npz was swapped is refused."""
    index = open_index(prefix)
    n = num_documents(index)
    if len(scores) != n or len(categories) != n:
        raise IndexedLabelsError(f"{len(scores)} scores and {len(categories)} categories for the {n} documents "
                                 f"of {prefix}")
    names = sorted({c for c in categories if c is not None})
    codes = np.array([NO_CATEGORY if c is None else names.index(c) for c in categories], dtype=np.int16)
    npz, header_path = out.with_name(out.name + ".npz"), out.with_name(out.name + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = npz.with_name(npz.name + ".partial")
    with open(partial, "wb") as f:
        np.savez(f, scores=np.asarray(scores, np.float64), categories=codes)
    os.replace(partial, npz)
    header = {"format": FORMAT, "index": str(Path(get_idx_path(str(prefix))).resolve()), "num_documents": n,
              "num_sequences": len(index), "idx_sha256": sha256_file(Path(get_idx_path(str(prefix)))),
              "npz_sha256": sha256_file(npz), "category_names": names, "classifier": classifier,
              "category_counts": dict(sorted(Counter(c for c in categories if c is not None).items()))}
    partial = header_path.with_name(header_path.name + ".partial")
    partial.write_text(json.dumps(header, indent=2))
    os.replace(partial, header_path)
    return DocumentLabels(np.asarray(scores, np.float64), codes, names, {**header, "path": str(header_path)})


def read_labels(prefix: str | Path, path: str | Path | None = None) -> DocumentLabels:
    """The sidecar of ``prefix`` (default `sidecar_path`), checked against the index: its document count, the
    ``.idx`` digest and the npz digest the header recorded."""
    index = open_index(prefix)
    out = Path(path) if path is not None else sidecar_path(prefix)
    out = out.with_suffix("") if out.suffix in (".json", ".npz") else out
    header_path, npz = out.with_name(out.name + ".json"), out.with_name(out.name + ".npz")
    for file in (header_path, npz):
        if not file.is_file():
            raise IndexedLabelsError(f"label sidecar {file} does not exist (write it with `megatron-sgtm data "
                                     f"tag-indexed --prefix {prefix}`)")
    try:
        header = json.loads(header_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexedLabelsError(f"label sidecar {header_path}: not valid JSON ({err})") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise IndexedLabelsError(f"label sidecar {header_path}: format is not {FORMAT!r}")
    n = num_documents(index)
    if header.get("num_documents") != n:
        raise IndexedLabelsError(f"label sidecar {header_path} labels {header.get('num_documents')} documents, but "
                                 f"the index {get_idx_path(str(prefix))} holds {n}")
    if header.get("idx_sha256") != sha256_file(Path(get_idx_path(str(prefix)))):
        raise IndexedLabelsError(f"label sidecar {header_path} was written for another index (its idx_sha256 does "
                                 f"not match {get_idx_path(str(prefix))}); re-tag this index")
    if header.get("npz_sha256") != sha256_file(npz):
        raise IndexedLabelsError(f"label sidecar {npz} does not match its header {header_path} (npz_sha256)")
    with np.load(npz, allow_pickle=False) as data:
        scores, codes = data["scores"], data["categories"]
    if len(scores) != n or len(codes) != n:
        raise IndexedLabelsError(f"label sidecar {npz} holds {len(scores)} scores for {n} documents")
    return DocumentLabels(scores, codes, list(header["category_names"]), {**header, "path": str(header_path)})


def read_categories(path: Path, count: int) -> list[str | None]:
    """One ground-truth category per line, in document order (an empty line: none)."""
    if not path.is_file():
        raise IndexedLabelsError(f"--categories {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) != count:
        raise IndexedLabelsError(f"--categories {path} has {len(lines)} lines for the {count} documents of the index "
                                 "(one category per document, in index order)")
    return [line.strip() or None for line in lines]


def document_tokens(index: IndexedDataset, first: int, last: int) -> Iterator[np.ndarray]:
    """The token ids of documents ``first..last-1`` (each its sequences concatenated)."""
    bounds = index.document_indices
    sequences = index[int(bounds[first]):int(bounds[last])]
    for d in range(first, last):
        yield np.concatenate(sequences[bounds[d] - bounds[first]:bounds[d + 1] - bounds[first]])


def tag_index(prefix: str | Path, out: Path, score: Callable[[list[str], list[str]], np.ndarray],
              decode: Callable[[list[list[int]]], list[str]] | None, categories: Sequence[str | None] | None,
              classifier: dict, batch: int = TAG_BATCH) -> DocumentLabels:
    """Score every document of the index (ids are document numbers; texts `decode`d from the token ids, empty
    without a decoder) and write the sidecar. Prints progress to stderr every `PROGRESS_EVERY_S`."""
    index = open_index(prefix)
    n = num_documents(index)
    if categories is not None and len(categories) != n:
        raise IndexedLabelsError(f"{len(categories)} categories for the {n} documents of {prefix}")
    scores = np.empty(n, dtype=np.float64)
    start = last_report = time.perf_counter()
    for first in range(0, n, batch):
        last = min(first + batch, n)
        ids = [str(d) for d in range(first, last)]
        texts = decode([t.tolist() for t in document_tokens(index, first, last)]) if decode else [""] * len(ids)
        scores[first:last] = score(ids, texts)
        bad = np.flatnonzero(~((scores[first:last] >= 0) & (scores[first:last] <= 1)))
        if len(bad):
            raise IndexedLabelsError(f"{prefix}: the classifier gave document {first + bad[0]} the score "
                                     f"{scores[first + bad[0]]!r}, outside [0, 1]")
        now = time.perf_counter()
        if now - last_report >= PROGRESS_EVERY_S or last == n:
            print(f"[tag-indexed] {last}/{n} docs, {last / max(now - start, 1e-9):,.0f} docs/s", file=sys.stderr,
                  flush=True)
            last_report = now
    return write_labels(prefix, out, scores, categories if categories is not None else [None] * n, classifier)


@dataclass
class LabelledGPTDatasetConfig(GPTDatasetConfig):
    """GPTDatasetConfig plus how documents get their SGTM labels: the `LabelingConfig` knobs (retain_rate,
    undiscovered_rate, false_positive_rate, thresholds, seed) and, per index prefix, its sidecar (default
    ``<prefix>.sgtm_labels``)."""

    labeling: LabelingConfig = field(default_factory=LabelingConfig)
    label_files: dict[str, str] | None = None


class LabelledGPTDataset(GPTDataset):
    """A `GPTDataset` whose samples also carry ``token_labels`` [seq_length] uint8 and ``doc_ids`` [seq_length]
    int64: the label and document of each input token (``tokens``); padding is UNLABELED / -1. Pass it as the
    class to `BlendedMegatronDatasetBuilder` with a `LabelledGPTDatasetConfig`. A sample is a pure function of
    its index, so a run resumed at sample k (megatron's consumed samples) continues exactly."""

    def __init__(self, indexed_dataset: IndexedDataset, dataset_path: str | None, indexed_indices: np.ndarray,
                 num_samples: int | None, index_split, config: LabelledGPTDatasetConfig) -> None:
        if not isinstance(config, LabelledGPTDatasetConfig):
            raise TypeError("LabelledGPTDataset needs a LabelledGPTDatasetConfig")
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        prefix = dataset_path if dataset_path is not None else indexed_dataset.path_prefix
        sidecar = (config.label_files or {}).get(prefix)
        self.sidecar = read_labels(prefix, sidecar)
        self.document_labels = self.sidecar.labels(config.labeling)
        self.sequence_documents = document_of_sequence(indexed_dataset)

    def token_documents(self, idx: int | None) -> np.ndarray:
        """The document of each input token of sample ``idx``, from megatron's sample and document indices (the
        same spans `_query_document_sample_shuffle_indices` reads); -1 for padding."""
        j = self.shuffle_index[0 if idx is None else idx]
        beg, beg_offset = (int(x) for x in self.sample_index[j])
        end, end_offset = (int(x) for x in self.sample_index[j + 1])
        extra = int(self.config.add_extra_token_to_sequence)
        sequences = np.asarray(self.document_index[beg:end + 1])
        lengths = self.dataset.sequence_lengths[sequences].astype(np.int64)
        if beg == end:
            lengths[0] = end_offset - beg_offset + extra
        else:
            lengths[0] -= beg_offset
            lengths[-1] = end_offset + extra
        docs = np.repeat(self.sequence_documents[sequences], lengths)
        total = self.config.sequence_length + extra
        docs = np.concatenate([docs, np.full(max(total - len(docs), 0), -1, np.int64)])
        return docs[:self.config.sequence_length]

    def __getitem__(self, idx: int | None) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)  # first: with defer_npy_index_mmap it loads the indices
        docs = self.token_documents(idx)
        labels = np.where(docs >= 0, self.document_labels[np.maximum(docs, 0)], TokenLabel.UNLABELED)
        sample["token_labels"] = torch.from_numpy(labels.astype(np.uint8))
        sample["doc_ids"] = torch.from_numpy(docs)
        return sample


def micro_batch_indices(step: int, micro: int, *, micro_batch_size: int, global_batch_size: int, dp_rank: int,
                        dp_size: int) -> np.ndarray:
    """The samples of micro-batch ``micro`` of global step ``step`` on DP rank ``dp_rank``, in Megatron-LM's
    pretraining-sampler layout: step g consumes samples [g*B, (g+1)*B), each run of micro_batch_size x dp_size
    consecutive samples dealt to the DP ranks in order. The same samples make step g at every DP size."""
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(f"global_batch_size {global_batch_size} must be a multiple of micro_batch_size "
                         f"{micro_batch_size} x dp_size {dp_size}")
    first = step * global_batch_size + micro * micro_batch_size * dp_size + dp_rank * micro_batch_size
    return np.arange(first, first + micro_batch_size)


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


TRAIN_KEYS = {"tokens": "tokens", "labels": "targets", "token_labels": "token_labels", "loss_mask": "loss_mask",
              "position_ids": "position_ids", "doc_ids": "doc_ids"}  # GPTDataset's "labels" are next-token targets


class IndexedSampler(MicroBatchStream):
    """One DP rank's micro-batches of a `LabelledGPTDataset`, in `micro_batch_indices`' layout, with the keys
    `megatron-sgtm train` reads (GPTDataset's ``labels`` renamed ``targets``). Its state is the global step
    (megatron's consumed samples = step x global batch size), so a resumed run continues the same samples."""

    def __init__(self, dataset: LabelledGPTDataset, *, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1):
        self.dataset, self.micro_batch_size, self.global_batch_size = dataset, micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_micro_batches = global_batch_size // (micro_batch_size * dp_size)
        micro_batch_indices(0, 0, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                            dp_rank=dp_rank, dp_size=dp_size)  # checks the layout
        self.step, self.micro = 0, 0

    def micro_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        indices = micro_batch_indices(step, micro, micro_batch_size=self.micro_batch_size,
                                      global_batch_size=self.global_batch_size, dp_rank=self.dp_rank,
                                      dp_size=self.dp_size)
        if indices[-1] >= len(self.dataset):
            raise IndexError(f"sample {indices[-1]} is past the dataset's {len(self.dataset)} samples")
        batch = collate([self.dataset[int(i)] for i in indices])
        out = {ours: batch[theirs] for theirs, ours in TRAIN_KEYS.items()}
        out["loss_mask"] = out["loss_mask"].float()
        return out

    def _fingerprint(self) -> str:
        return f"{self.dataset.unique_description_hash}:{self.dataset.sidecar.header['npz_sha256']}"

    def state_dict(self) -> dict:
        return {"step": self.step, "micro": self.micro, "fingerprint": self._fingerprint(),
                "global_batch_size": self.global_batch_size}

    def check_resumable(self, state: dict) -> None:
        if state.get("global_batch_size") != self.global_batch_size:
            raise ValueError(f"optim.global_batch_size={self.global_batch_size}, but the checkpoint was saved with "
                             f"{state.get('global_batch_size')}; its position is counted in global steps of that size")
        if state.get("fingerprint") != self._fingerprint():
            raise ValueError("sampler state was saved with another indexed dataset, split, sidecar or sample count; "
                             "resuming would not continue the same samples")
        if state.get("micro"):
            raise ValueError(f"sampler state stopped inside global step {state['step']}")

    def load_state_dict(self, state: dict) -> None:
        self.check_resumable(state)
        self.step, self.micro = int(state["step"]), 0


def indexed_corpus(prefix: str | Path, labels: DocumentLabels, eod_id: int, vocab_size: int) -> Corpus:
    """The index as a `Corpus` (tokens memory-mapped from the ``.bin``, no copy) for the code that reads documents
    by number: held-out evaluation streams, token counts. Needs the ``.bin`` in index order (as the builder writes)."""
    index = open_index(prefix)
    lengths = index.sequence_lengths.astype(np.int64)
    itemsize = np.dtype(index.index.dtype).itemsize
    token_starts = np.concatenate([[0], np.cumsum(lengths)])
    if not np.array_equal(index.index.sequence_pointers, token_starts[:-1] * itemsize):
        raise IndexedLabelsError(f"indexed dataset {prefix}: its sequences are not stored in index order")
    tokens = np.memmap(get_bin_path(str(prefix)), dtype=index.index.dtype, mode="r", shape=(int(token_starts[-1]),))
    return Corpus(tokens=tokens, offsets=token_starts[index.document_indices], ids=[str(d) for d in
                  range(labels.num_documents)], categories=labels.categories.astype(np.int16),
                  category_names=list(labels.category_names), scores=labels.scores, eod_id=eod_id,
                  vocab_size=vocab_size)
