"""Raw documents -> tokenized WebDataset shards + tokenizer copy + manifest (`megatron-sgtm data build`).

Tokenization runs on ``workers`` processes, each single-threaded, fed batches in order and at most two
batches ahead per worker. A worker hands back each document's finished tar members and id digest, so the main
process only reads input and appends bytes to the shard being written: the shards are the same bytes for
any number of workers, and memory stays flat however large a streamed corpus is (documents are read,
tokenized and written a batch at a time).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import count, islice
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
    TarredDoc,
    check_new_output,
    encode_tokens,
    read_shard,
    tarred,
    write_shards,
)
from megatron_sgtm.data.sources import Document
from megatron_sgtm.data.tokenizer import eod_id

ENCODE_BATCH = 128  # small enough that 2 workers stay balanced on a 3,000-document corpus

_worker_tokenizer: Tokenizer | None = None


def _encode(tokenizer: Tokenizer, first: int, batch: list[Document]) -> tuple[list[TarredDoc], np.ndarray]:
    """The batch's documents as shard members (keys numbered from ``first``, end-of-document token appended)
    and the digests of their ids: everything per document happens here, in the workers."""
    eod = eod_id(tokenizer)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32
    docs = []
    for index, (doc, encoding) in enumerate(zip(
            batch, tokenizer.encode_batch([d.text for d in batch], add_special_tokens=False), strict=True), first):
        tokens = np.asarray([*encoding.ids, eod], dtype=dtype)
        meta = {"id": doc.id, "text": doc.text, "num_tokens": len(tokens)}
        if doc.category is not None:
            meta["category"] = doc.category
        docs.append(ShardDoc.from_meta(f"{index:09d}", meta, encode_tokens(tokens)))
    return tarred(docs), id_digests([doc.id for doc in batch])


def _start_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _encode_in_worker(first: int, batch: list[Document]) -> tuple[list[TarredDoc], np.ndarray]:
    return _encode(_worker_tokenizer, first, batch)


def _encoded_batches(batches: Iterator[tuple[int, list[Document]]], tokenizer: Tokenizer, workers: int
                     ) -> Iterator[tuple[list[TarredDoc], np.ndarray]]:
    """Each batch encoded, in input order; at most ``2 * workers`` batches in flight."""
    if workers == 1:
        yield from (_encode(tokenizer, first, batch) for first, batch in batches)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_start_worker, initargs=(tokenizer.to_str(),)) as pool:
        pending: deque = deque()
        for first, batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (first, batch)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def id_digests(ids: list[str]) -> np.ndarray:
    """64-bit digests of document ids, 8 bytes per document where a set of the ids would grow a streamed
    build by ~100 bytes per document."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids),
                       dtype=np.uint64, count=len(ids))


def first_duplicate(digests: list[np.ndarray]) -> tuple[int, int] | None:
    """Indices (first, second) of two documents whose id digests are equal, or None. Duplicates are found
    once every id is in (the build then fails and publishes nothing)."""
    flat = np.concatenate([np.zeros(0, np.uint64), *digests])
    order = np.argsort(flat, kind="stable")
    same = np.flatnonzero(flat[order][1:] == flat[order][:-1])
    return (int(order[same[0]]), int(order[same[0] + 1])) if len(same) else None


def tokenized(docs: Iterable[Document], tokenizer: Tokenizer, digests: list[np.ndarray], workers: int = 1
              ) -> Iterator[TarredDoc]:
    """Shard records in input order; the digests of their ids go to ``digests``."""
    docs = iter(docs)
    batches = ((first, batch) for first, batch in zip(
        count(0, ENCODE_BATCH), iter(lambda: list(islice(docs, ENCODE_BATCH)), [])))
    for encoded, ids in _encoded_batches(batches, tokenizer, workers):
        digests.append(ids)
        yield from encoded


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
        digests: list[np.ndarray] = []
        shards = write_shards(tokenized(docs, tokenizer, digests, workers), work, docs_per_shard,
                              Progress(None, "build"))
        if (duplicate := first_duplicate(digests)) is not None:  # scores files and exactly-once accounting key on ids
            first, second = duplicate
            shard = list(read_shard(work / (SHARD_PATTERN % (second // docs_per_shard))))
            raise ValueError(f"document id {shard[second % docs_per_shard].id!r} occurs twice (documents {first} "
                             f"and {second} of the input); ids must be unique")
        manifest = Manifest(shards=shards, eod_id=eod_id(tokenizer), vocab_size=tokenizer.get_vocab_size())
        if manifest.num_docs == 0:
            raise ValueError("the inputs hold no documents")
        manifest.write(work)
    return manifest
