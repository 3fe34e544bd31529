"""WebDataset tar shards of tokenized documents, their manifest, and corruption detection.

A sample is ``<key>.json`` (id, text, num_tokens, category when known, score once tagged) plus
``<key>.tokens.npy`` (the document's token ids, end-of-document token included). The manifest
records per-shard counts, token totals and SHA-256 checksums, so a truncated or modified shard is
caught before its documents are used. Bad shards fail loudly unless ``skip_bad`` is given, and
even then every skipped shard is reported.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain, islice
from pathlib import Path

import numpy as np

from megatron_sgtm.errors import UserError

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SHARD_PATTERN = "shard-%06d.tar"
FORMAT = "megatron-sgtm-shards/1"
BLOCK = 512  # tar's block: headers and padded payloads


class ShardError(UserError, ValueError):
    """A shard (or a document in it) is unreadable or inconsistent; the message names it."""


class ManifestError(ShardError):
    """A manifest.json whose counts, categories or vocabulary disagree with its shards (edited after it was
    written: the shards' checksums do not cover it); never skipped by ``skip_bad_shards``."""


@dataclass(frozen=True)
class ShardDoc:
    """One stored document, kept in its encoded form (``meta_json``, ``tokens_npy``) so tagging can
    re-write a shard without re-encoding texts and token arrays."""

    key: str
    meta_json: bytes
    tokens_npy: bytes

    @staticmethod
    def from_meta(key: str, meta: dict, tokens_npy: bytes) -> ShardDoc:
        doc = ShardDoc(key, json.dumps(meta, ensure_ascii=False).encode(), tokens_npy)
        doc.__dict__["meta"] = meta  # prime the cached_property: parsing it back would cost as much as dumping
        return doc

    @cached_property
    def meta(self) -> dict:
        return json.loads(self.meta_json)

    @property
    def id(self) -> str:
        return self.meta["id"]

    @property
    def num_tokens(self) -> int:
        return self.meta["num_tokens"]

    @property
    def category(self) -> str | None:
        return self.meta.get("category")

    def tokens(self) -> np.ndarray:
        return np.load(io.BytesIO(self.tokens_npy), allow_pickle=False)

    def with_score(self, score: float) -> ShardDoc:
        """A copy carrying ``score``; appended to the stored JSON object rather than re-encoding it."""
        meta = {**self.meta, "score": score}
        if "score" in self.meta:
            return ShardDoc.from_meta(self.key, meta, self.tokens_npy)
        doc = ShardDoc(self.key, self.meta_json.rstrip()[:-1] + b', "score": ' + repr(float(score)).encode() + b"}",
                       self.tokens_npy)
        doc.__dict__["meta"] = meta  # prime the cached_property: parsing it back would cost as much as dumping
        return doc


@dataclass(frozen=True)
class TarredDoc:
    """A document in the form its shard stores it: its two tar members (header and padded payload each) and
    what the manifest counts of it. Build workers make these, so the process that writes shards only joins
    bytes."""

    members: bytes
    num_tokens: int
    category: str | None


def tarred(docs: Iterable[ShardDoc]) -> list[TarredDoc]:
    """Each document's members exactly as webdataset's `TarWriter(encoder=False, mtime=0)` writes them (the
    same documents give the same bytes): headers made by `tarfile` with the writer's settings, here rather than
    through webdataset, whose import (torch, ~1 s of CPU) would cost each build worker more than a small
    corpus's tokenizing. `tests/unit/test_data_shards.py` compares the bytes with `TarWriter`'s."""
    out = []
    for doc in docs:
        members = []
        for extension, payload in (("json", doc.meta_json), ("tokens.npy", doc.tokens_npy)):  # TarWriter's order
            info = tarfile.TarInfo(f"{doc.key}.{extension}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(payload), 0, 0o444, "bigdata", "bigdata"
            members += [info.tobuf(tarfile.DEFAULT_FORMAT, tarfile.ENCODING, "surrogateescape"), payload,
                        bytes(-len(payload) % BLOCK)]
        out.append(TarredDoc(b"".join(members), doc.num_tokens, doc.category))
    return out


def end_of_archive(size: int) -> bytes:
    """What `tarfile` writes on closing an archive of ``size`` bytes of members: two zero blocks, then zeros
    up to a whole record."""
    return bytes(2 * BLOCK + -(size + 2 * BLOCK) % tarfile.RECORDSIZE)


def encode_tokens(tokens: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, tokens, allow_pickle=False)
    return buffer.getvalue()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _members(path: Path, data: bytes) -> list[tuple[str, bytes]]:
    """(name, payload) of each file of a shard held in memory, read by webdataset's tar iterator.

    The tar module stops without error at a damaged header after the first member (it takes it for
    the end of the archive), and at a cut between members. Our shards hold one 512-byte header per
    member (short ustar names), so the members read must end exactly where the end-of-archive zero
    blocks start; anything else is damage, named with the byte where reading stopped.
    """
    from webdataset.tariterators import tar_file_iterator  # here: importing webdataset imports torch (~1 s)

    try:
        members = [(m["fname"], m["data"]) for m in tar_file_iterator(io.BytesIO(data), skip_meta=None)]
    except tarfile.TarError as e:
        # webdataset appends " @ <stream>" to the message
        raise ShardError(f"shard {path}: truncated or corrupt tar ({str(e).split(' @ ')[0]})") from e
    end = sum(BLOCK + len(payload) + -len(payload) % BLOCK for _, payload in members)
    if len(data) < end + 2 * BLOCK:
        raise ShardError(f"shard {path}: truncated tar (no end-of-archive marker after byte {end})")
    if data[end:end + 2 * BLOCK] != bytes(2 * BLOCK):
        raise ShardError(f"shard {path}: corrupt tar header at byte {end} (checksum mismatch or damaged)")
    return members


def read_shard(path: Path, sha256: str | None = None) -> Iterator[ShardDoc]:
    """Documents of one shard in order; any damage raises `ShardError` naming the shard and member.
    With ``sha256`` (from the manifest) the file must also match the checksum it was written with."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ShardError(f"shard {path}: cannot be read ({e.strerror})") from e
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ShardError(f"shard {path}: checksum mismatch (truncated or modified since it was written)")
    pending: dict[str, dict[str, bytes]] = {}
    for name, payload in _members(path, data):
        key, _, ext = name.partition(".")
        if ext not in ("json", "tokens.npy"):
            raise ShardError(f"shard {path}: unexpected member {name!r}")
        parts = pending.setdefault(key, {})
        parts[ext] = payload
        if len(parts) == 2:
            del pending[key]
            yield _decode(path, key, parts)
    if pending:
        key = next(iter(pending))
        raise ShardError(f"shard {path}: document {key!r} lacks member(s) "
                         f"{sorted({'json', 'tokens.npy'} - set(pending[key]))}")


def _decode(path: Path, key: str, parts: dict[str, bytes]) -> ShardDoc:
    doc = ShardDoc(key=key, meta_json=parts["json"], tokens_npy=parts["tokens.npy"])
    try:
        meta = doc.meta
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"shard {path}: document {key!r} has invalid json ({e})") from e
    if not isinstance(meta, dict):
        raise ShardError(f"shard {path}: document {key!r} json is not an object")
    for name, kind in (("id", str), ("text", str), ("num_tokens", int)):
        if not isinstance(meta.get(name), kind):
            raise ShardError(f"shard {path}: document {key!r} field {name!r} is missing or not a {kind.__name__}")
    return doc


@dataclass
class ShardInfo:
    name: str
    num_docs: int = 0
    num_tokens: int = 0
    sha256: str = ""
    categories: dict[str, int] = field(default_factory=dict)

    def add(self, doc: ShardDoc | TarredDoc) -> None:
        self.num_docs += 1
        self.num_tokens += doc.num_tokens
        if doc.category is not None:
            self.categories[doc.category] = self.categories.get(doc.category, 0) + 1


@dataclass
class Manifest:
    """What a shard directory holds; ``extra`` carries tagging statistics."""

    shards: list[ShardInfo]
    eod_id: int
    vocab_size: int
    tokenizer: str = TOKENIZER_FILE
    extra: dict = field(default_factory=dict)

    @property
    def num_docs(self) -> int:
        return sum(s.num_docs for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    def categories(self) -> dict[str, int]:
        total: Counter = Counter()
        for s in self.shards:
            total.update(s.categories)
        return dict(sorted(total.items()))

    def to_json(self) -> dict:
        return {"format": FORMAT, "tokenizer": self.tokenizer, "eod_id": self.eod_id,
                "vocab_size": self.vocab_size, "num_docs": self.num_docs, "num_tokens": self.num_tokens,
                "categories": self.categories(), "shards": [vars(s) for s in self.shards], **self.extra}

    def write(self, directory: Path) -> None:
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n")
        os.replace(tmp, directory / MANIFEST)

    @staticmethod
    def read(directory: Path) -> Manifest:
        path = directory / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{directory} has no {MANIFEST}; is it a shard directory written by "
                                    "`megatron-sgtm data build` or `data tag`?")
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}")
        known = {"format", "tokenizer", "eod_id", "vocab_size", "num_docs", "num_tokens", "categories", "shards"}
        manifest = Manifest(shards=[ShardInfo(**s) for s in data["shards"]], eod_id=data["eod_id"],
                            vocab_size=data["vocab_size"], tokenizer=data["tokenizer"],
                            extra={k: v for k, v in data.items() if k not in known})
        manifest.check_totals(path, data)
        return manifest

    def check_totals(self, path: Path, data: dict) -> None:
        """The totals `data` (the file's JSON) states are its shards' sums, and the vocabulary holds eod_id."""
        vocab = self.vocab_size
        if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
            raise ManifestError(f"{path}: vocab_size={vocab!r}: expected a positive integer")
        if isinstance(self.eod_id, bool) or not isinstance(self.eod_id, int) or not 0 <= self.eod_id < vocab:
            raise ManifestError(f"{path}: eod_id={self.eod_id!r}: expected a token id below vocab_size={vocab}")
        for key, total in (("num_docs", self.num_docs), ("num_tokens", self.num_tokens),
                           ("categories", self.categories())):
            if key in data and data[key] != total:
                raise ManifestError(f"{path}: {key} is {data[key]} but its shards' entries sum to {total} (edited "
                                    "after `data build`/`data tag` wrote it; rebuild the shards)")


def check_entry(directory: Path, info: ShardInfo, found: ShardInfo) -> None:
    """A shard's manifest entry describes what the shard holds (`found`): the checksum covers the shard, not
    the entry's counts."""
    for key in ("num_docs", "num_tokens", "categories"):
        if getattr(info, key) != getattr(found, key):
            raise ManifestError(f"{directory / MANIFEST}: shard {info.name}: {key} is {getattr(info, key)} but the "
                                f"shard holds {getattr(found, key)} (the manifest was edited; rebuild the shards)")


def counted(docs: Iterable[ShardDoc], into: ShardInfo) -> Iterator[ShardDoc]:
    """`docs`, each added to `into`'s counts as it passes (for `check_entry` once all are read)."""
    for doc in docs:
        into.add(doc)
        yield doc


def check_new_output(out: Path) -> None:
    """Outputs are written once: an existing non-empty ``out`` (a finished run, or anything else) is refused."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} already exists and is not empty; choose another --out or remove it")


def report_skipped(reasons: list[str], total: int, where: Path) -> None:
    """Skipping is never silent: the count and each shard's reason go to stderr."""
    if reasons:
        print(f"skipped {len(reasons)} bad shard(s) of {total} in {where}:", file=sys.stderr)
        for reason in reasons:
            print(f"  {reason}", file=sys.stderr)


def read_good_shards(directory: Path, manifest: Manifest, skip_bad: bool,
                     consume: Callable[[Path, Iterator[ShardDoc]], None]) -> int:
    """Feed each listed shard's path and documents (checksum-verified) to ``consume``, which reads them all. Without
    ``skip_bad`` the first bad shard raises; with it, bad shards are reported and their number returned. ``consume``
    should keep a shard's documents only once it has read them all. A manifest entry that disagrees with its
    shard is always an error (`ManifestError`)."""
    bad = []
    for info in manifest.shards:
        found = ShardInfo(info.name)
        try:
            consume(directory / info.name, counted(read_shard(directory / info.name, info.sha256), found))
        except ShardError as e:
            if not skip_bad:
                raise
            bad.append(str(e))
            continue
        check_entry(directory, info, found)
    report_skipped(bad, len(manifest.shards), directory)
    return len(bad)


class Progress:
    """One line per finished shard with throughput, so long builds and tagging runs show progress."""

    def __init__(self, total: int | None, what: str):
        self.total, self.what = total, what
        self.start, self.done_docs, self.done_shards = time.perf_counter(), 0, 0

    def shard_done(self, name: str, num_docs: int) -> None:
        self.done_shards += 1
        self.done_docs += num_docs
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        print(f"[{self.what}] {self.done_shards}{of} {name}: {num_docs} docs, {self.done_docs} total, "
              f"{self.done_docs / elapsed:,.0f} docs/s", file=sys.stderr, flush=True)


def write_shards(docs: Iterable[TarredDoc], directory: Path, docs_per_shard: int,
                 progress: Progress | None = None) -> list[ShardInfo]:
    """Write documents into shards of ``docs_per_shard`` (`write_shard`); returns the manifest entries."""
    infos: list[ShardInfo] = []
    docs = iter(docs)
    while (first := next(docs, None)) is not None:  # each shard streams to disk as its documents arrive
        infos.append(write_shard(directory / (SHARD_PATTERN % len(infos)),
                                 chain([first], islice(docs, docs_per_shard - 1))))
        if progress:
            progress.shard_done(infos[-1].name, infos[-1].num_docs)
    return infos


def write_shard(path: Path, docs: Iterable[TarredDoc]) -> ShardInfo:
    """Write one shard: the documents' members as they arrive, then the end-of-archive blocks (the bytes
    webdataset's `TarWriter` writes for them); atomically (``.tmp`` then rename), so an interrupted run
    leaves no partial shard."""
    tmp = path.with_name(path.name + ".tmp")
    info = ShardInfo(path.name)
    digest, size = hashlib.sha256(), 0
    with open(tmp, "wb") as f:
        for doc in docs:
            info.add(doc)
            f.write(doc.members)
            digest.update(doc.members)
            size += len(doc.members)
        trailer = end_of_archive(size)
        f.write(trailer)
        digest.update(trailer)
    info.sha256 = digest.hexdigest()
    os.replace(tmp, path)
    return info
