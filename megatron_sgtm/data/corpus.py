"""A shard directory loaded into flat numpy arrays: the random-access form the sampler packs from."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_sgtm.data.shards import MANIFEST, Manifest, ManifestError, ShardDoc, ShardError, read_good_shards

NO_CATEGORY = -1


@dataclass
class Corpus:
    """Documents as ``tokens[offsets[i]:offsets[i+1]]``; ``scores`` is NaN where a document is untagged."""

    tokens: np.ndarray
    offsets: np.ndarray
    ids: list[str]
    categories: np.ndarray
    category_names: list[str]
    scores: np.ndarray
    eod_id: int
    vocab_size: int
    skipped_shards: int = 0

    @property
    def num_docs(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def category_mask(self, names: tuple[str, ...] | list[str]) -> np.ndarray:
        """Documents whose ground-truth category is one of ``names``."""
        codes = [self.category_names.index(n) for n in names if n in self.category_names]
        return np.isin(self.categories, codes)

    def has_truth(self) -> bool:
        return bool(self.num_docs) and bool((self.categories != NO_CATEGORY).all())


def check_score(score: object, where: str) -> float:
    """A P(forget) must be a number in [0, 1]; anything else names the document and field."""
    if isinstance(score, bool) or not isinstance(score, int | float) or math.isnan(score) or not 0 <= score <= 1:
        raise ShardError(f"{where}: field 'score' must be a number in [0, 1], got {score!r}")
    return float(score)


def load_corpus(directory: Path, require_scores: bool = False, skip_bad_shards: bool = False) -> Corpus:
    """Read every shard listed in the manifest (checksums verified). ``require_scores`` makes a
    document without a ``score`` an error, for consumers that need tagged data."""
    manifest = Manifest.read(directory)
    rows: list[tuple[np.ndarray, str, int, float]] = []  # (tokens, id, category code, score) per document
    names: dict[str, int] = {}

    def consume(path: Path, docs: Iterator[ShardDoc]) -> None:
        """Parse a whole shard before keeping any of it, so a bad shard contributes nothing."""
        shard = []
        for doc in docs:
            where = f"shard {path}: document {doc.id!r}"
            score = doc.meta.get("score")
            if score is None and require_scores:
                raise ShardError(f"{where}: field 'score' is missing (tagged data is required; run "
                                 "`megatron-sgtm data tag`)")
            tokens = doc.tokens()
            if tokens.size and int(tokens.max()) >= manifest.vocab_size:
                raise ManifestError(f"{directory / MANIFEST}: vocab_size is {manifest.vocab_size} but {where} holds "
                                    f"token id {int(tokens.max())} (the manifest was edited; rebuild the shards)")
            category = doc.meta.get("category")
            code = NO_CATEGORY if category is None else names.setdefault(category, len(names))
            shard.append((tokens, doc.id, code, math.nan if score is None else check_score(score, where)))
        rows.extend(shard)

    skipped = read_good_shards(directory, manifest, skip_bad_shards, consume)
    token_chunks, ids, categories, scores = (list(column) for column in zip(*rows)) if rows else ([], [], [], [])
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in token_chunks], out=offsets[1:])
    dtype = np.uint16 if manifest.vocab_size <= 1 << 16 else np.uint32
    return Corpus(
        tokens=np.concatenate(token_chunks).astype(dtype) if token_chunks else np.zeros(0, dtype),
        offsets=offsets, ids=ids, categories=np.asarray(categories, dtype=np.int16),
        category_names=list(names), scores=np.asarray(scores, dtype=np.float64), eod_id=manifest.eod_id,
        vocab_size=manifest.vocab_size, skipped_shards=skipped)


def heldout_split(corpus: Corpus, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) document indices. Membership hashes the document id, so it is stable when
    shards are added or skipped; per-category evaluation streams select from the held-out part."""
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    limit = int(fraction * 2**64)
    draws = np.fromiter(
        (int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little")
         for i in corpus.ids), dtype=np.uint64, count=corpus.num_docs)
    held = draws < np.uint64(limit) if limit else np.zeros(corpus.num_docs, dtype=bool)
    return np.flatnonzero(~held), np.flatnonzero(held)
