"""Raw documents -> tokenized WebDataset shards + tokenizer copy + manifest (`megatron-sgtm data build`).

Tokenization runs on ``workers`` processes, each single-threaded, fed batches in order and at most two
batches ahead per worker: the shards are the same bytes for any number of workers, and memory stays flat
however large a streamed corpus is (documents are read, tokenized and written a batch at a time).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from megatron_sgtm.atomic import building, partial_dir
from megatron_sgtm.data.shards import (
    SHARD_PATTERN,
    TOKENIZER_FILE,
    Manifest,
    Progress,
    ShardDoc,
    check_new_output,
    encode_tokens,
    read_shard,
    write_shards,
)
from megatron_sgtm.data.sources import Document
from megatron_sgtm.data.tokenizer import eod_id

ENCODE_BATCH = 256

_worker_tokenizer: Tokenizer | None = None


def _encode(tokenizer: Tokenizer, batch: list[Document]) -> list[tuple[bytes, bytes]]:
    """(meta JSON, token ids as .npy) of each document, end-of-document token appended."""
    eod = eod_id(tokenizer)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32
    out = []
    for doc, encoding in zip(batch, tokenizer.encode_batch([d.text for d in batch], add_special_tokens=False),
                             strict=True):
        tokens = np.asarray([*encoding.ids, eod], dtype=dtype)
        meta = {"id": doc.id, "text": doc.text, "num_tokens": len(tokens)}
        if doc.category is not None:
            meta["category"] = doc.category
        out.append((json.dumps(meta, ensure_ascii=False).encode(), encode_tokens(tokens)))
    return out


def _start_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _encode_in_worker(batch: list[Document]) -> list[tuple[bytes, bytes]]:
    return _encode(_worker_tokenizer, batch)


def _encoded_batches(batches: Iterator[list[Document]], tokenizer: Tokenizer, workers: int
                     ) -> Iterator[tuple[list[Document], list[tuple[bytes, bytes]]]]:
    """Each batch with its encodings, in input order; at most ``2 * workers`` batches in flight."""
    if workers == 1:
        yield from ((batch, _encode(tokenizer, batch)) for batch in batches)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_start_worker, initargs=(tokenizer.to_str(),)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(_encode_in_worker, (batch,))))
            if len(pending) >= 2 * workers:
                batch, result = pending.popleft()
                yield batch, result.get()
        while pending:
            batch, result = pending.popleft()
            yield batch, result.get()


class IdDigests:
    """64-bit digests of the document ids, 8 bytes per document where a set of the ids would grow a streamed
    build by ~100 bytes per document. Duplicates are found once every id is in (the build then fails and
    publishes nothing)."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []

    def add(self, ids: list[str]) -> None:
        self.chunks.append(np.fromiter(
            (int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids),
            dtype=np.uint64, count=len(ids)))

    def first_duplicate(self) -> tuple[int, int] | None:
        """Indices (first, second) of two documents whose ids hash alike, or None."""
        digests = np.concatenate([np.zeros(0, np.uint64), *self.chunks])
        order = np.argsort(digests, kind="stable")
        same = np.flatnonzero(digests[order][1:] == digests[order][:-1])
        return (int(order[same[0]]), int(order[same[0] + 1])) if len(same) else None


def tokenized(docs: Iterable[Document], tokenizer: Tokenizer, ids: IdDigests, workers: int = 1
              ) -> Iterator[ShardDoc]:
    """Shard records with the end-of-document token appended; their ids go to ``ids``."""
    index = 0
    docs = iter(docs)
    batches = iter(lambda: list(islice(docs, ENCODE_BATCH)), [])
    for batch, encoded in _encoded_batches(batches, tokenizer, workers):
        ids.add([doc.id for doc in batch])
        for meta_json, tokens_npy in encoded:
            yield ShardDoc(f"{index:09d}", meta_json, tokens_npy)
            index += 1


def build_shards(docs: Iterable[Document], tokenizer: Tokenizer, out_dir: Path, docs_per_shard: int = 10_000,
                 workers: int = 1) -> Manifest:
    """Write everything into ``OUT.partial`` and rename it to ``out_dir`` once the manifest is in, so a
    failed build (bad input half-way, full disk) leaves nothing that looks like a shard directory."""
    check_new_output(out_dir)
    # One core per worker: the Rust tokenizer's own thread pool would make "N workers" mean more cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if partial_dir(out_dir).exists():
        print(f"[build] removing {partial_dir(out_dir)}, left by an interrupted build", file=sys.stderr)
    with building(out_dir) as work:  # builds do not resume: a failed one keeps nothing
        tokenizer.save(str(work / TOKENIZER_FILE))
        ids = IdDigests()
        shards = write_shards(tokenized(docs, tokenizer, ids, workers), work, docs_per_shard, Progress(None, "build"))
        if (duplicate := ids.first_duplicate()) is not None:  # scores files and exactly-once accounting key on ids
            first, second = duplicate
            shard = list(read_shard(work / (SHARD_PATTERN % (second // docs_per_shard))))
            raise ValueError(f"document id {shard[second % docs_per_shard].id!r} occurs twice (documents {first} "
                             f"and {second} of the input); ids must be unique")
        manifest = Manifest(shards=shards, eod_id=eod_id(tokenizer), vocab_size=tokenizer.get_vocab_size())
        if manifest.num_docs == 0:
            raise ValueError("the inputs hold no documents")
        manifest.write(work)
    return manifest
