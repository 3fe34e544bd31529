"""Raw documents -> tokenized WebDataset shards + tokenizer copy + manifest (`megatron-sgtm data build`).

Tokenization runs on ``workers`` processes, each single-threaded: this one and a pool of ``workers - 1``,
fed batches in order, at most two ahead per pool worker; this process encodes a batch itself whenever the
pool is full. Whoever encodes a batch makes each document's finished tar members and id digest, so this
process otherwise only reads input and appends bytes to the shard being written: the shards are the same
bytes for any number of workers, and memory stays flat however large a streamed corpus is (documents are
read, tokenized and written a batch at a time).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from multiprocessing.pool import AsyncResult
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

# A batch ends at ENCODE_BATCH documents or ENCODE_BATCH_CHARS characters of text, whichever comes first: batches
# of similar work, large enough that handing them over costs little, small enough that the last ones (which
# one process finishes while the other waits) are short. Measured with 2 workers: 128 documents was best on
# short documents (~900 characters) and 32 on man pages (~2,800): both about 100k characters.
ENCODE_BATCH = 128
ENCODE_BATCH_CHARS = 100_000

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
    """Each batch encoded, in input order, by ``workers`` processes: this one and ``workers - 1`` in a pool.
    The pool keeps at most two batches per process in flight; whenever it is full this process encodes the next
    batch itself. So it works from the first batch while the pool's interpreters start, its own share is never
    pickled, and a corpus of a few seconds is not held up by the starts."""
    if workers == 1:
        yield from (_encode(tokenizer, first, batch) for first, batch in batches)
        return
    ctx = multiprocessing.get_context(_start_method())
    in_flight = 2 * (workers - 1)
    with ctx.Pool(workers - 1, initializer=_start_worker, initargs=(tokenizer.to_str(),)) as pool:
        pending: deque = deque()  # AsyncResult (the pool's) or the encoded batch (ours), in input order
        for first, batch in batches:
            if sum(isinstance(item, AsyncResult) and not item.ready() for item in pending) < in_flight:
                pending.append(pool.apply_async(_encode_in_worker, (first, batch)))
            else:
                pending.append(_encode(tokenizer, first, batch))
            while pending and (not isinstance(pending[0], AsyncResult) or pending[0].ready()
                               or len(pending) > 2 * in_flight):  # bounded memory: wait for the oldest
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())


def _start_method() -> str:
    """``fork`` where it is safe (Linux, no other Python thread in this process to hold a lock the child would
    inherit; the Rust tokenizer's own threads are off, TOKENIZERS_PARALLELISM): a forked worker starts at once
    with the modules loaded. ``spawn`` otherwise, whose worker first spends ~0.25 s importing: on a
    few-second corpus that late start alone cost a tenth of the 2-worker speed-up (docs/results/data.md)."""
    return "fork" if sys.platform == "linux" and threading.active_count() == 1 else "spawn"


def _result(item) -> tuple[list[TarredDoc], np.ndarray]:
    return item.get() if isinstance(item, AsyncResult) else item


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


def _batches(docs: Iterable[Document]) -> Iterator[tuple[int, list[Document]]]:
    """(index of the first document, the documents) of consecutive batches (see ENCODE_BATCH)."""
    first, batch, chars = 0, [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) == ENCODE_BATCH or chars >= ENCODE_BATCH_CHARS:
            yield first, batch
            first, batch, chars = first + len(batch), [], 0
    if batch:
        yield first, batch


def tokenized(docs: Iterable[Document], tokenizer: Tokenizer, digests: list[np.ndarray], workers: int = 1
              ) -> Iterator[TarredDoc]:
    """Shard records in input order; the digests of their ids go to ``digests``."""
    for encoded, ids in _encoded_batches(_batches(docs), tokenizer, workers):
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
