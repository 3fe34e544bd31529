"""Readers turning local corpora (JSONL, text, parquet, WebDataset tars, `datasets.load_from_disk`)
into documents.

Nothing is downloaded: every source is a local path. Errors name the file and line or row. An empty
(or whitespace-only) document is refused rather than skipped: it would train on nothing but an
end-of-document token, and it usually means the wrong --text-field or a broken export.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_sgtm.data.shards import tar_members


@dataclass(frozen=True)
class Document:
    """One raw document; ``category`` is the ground truth when the source knows it."""

    id: str
    text: str
    category: str | None = None


@dataclass(frozen=True)
class Fields:
    """Names of the record fields holding the id, text and ground-truth category."""

    id: str = "id"
    text: str = "text"
    category: str = "category"


def _check_not_empty(text: str, where: str, what: str) -> None:
    if not text.strip():
        raise ValueError(f"{where}: {what} is empty (empty documents are refused; remove them from the input)")


def _from_record(record: dict, fields: Fields, default_id: str, where: str) -> Document:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    text = record.get(fields.text)
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {fields.text!r} is missing or not a string")
    _check_not_empty(text, where, f"field {fields.text!r}")
    doc_id = record.get(fields.id, default_id)
    category = record.get(fields.category)
    return Document(id=str(doc_id), text=text, category=None if category is None else str(category))


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line; bytes that are not UTF-8 are an error naming the line and the
    byte offset in the file (a text-mode read would only say where in its buffer decoding failed)."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at offset "
                                 f"{offset + e.start} of the file)") from None
            yield lineno, line
            offset += len(raw)


def jsonl_records(path: Path) -> Iterator[tuple[int, str, dict]]:
    """(line number, "path:line" for messages, record) of each non-blank line of a JSONL file."""
    for lineno, line in utf8_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg})") from e
        yield lineno, where, record


def read_jsonl(path: Path, fields: Fields = Fields()) -> Iterator[Document]:
    for lineno, where, record in jsonl_records(path):
        yield _from_record(record, fields, f"{path.stem}-{lineno}", where)


def read_text(path: Path) -> Iterator[Document]:
    """Plain text: one document per non-blank line (blank lines separate), id ``<stem>-<line>``."""
    for lineno, line in utf8_lines(path):
        if line.strip():
            yield Document(id=f"{path.stem}-{lineno}", text=line.rstrip("\r\n"))


def _from_rows(path: Path, records: Iterable[dict], fields: Fields, stem: str) -> Iterator[Document]:
    for row, record in enumerate(records):
        yield _from_record(record, fields, f"{stem}-{row}", f"{path} row {row}")


def read_parquet(path: Path, fields: Fields = Fields()) -> Iterator[Document]:
    import pyarrow.parquet as pq

    batches = pq.ParquetFile(path).iter_batches()
    yield from _from_rows(path, (record for batch in batches for record in batch.to_pylist()), fields, path.stem)


def read_hf_disk(path: Path, fields: Fields = Fields()) -> Iterator[Document]:
    """A dataset saved with ``datasets.save_to_disk`` (the optional `datasets` package)."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as e:
        raise ImportError(f"{path} is a `datasets` directory; install the optional `datasets` package") from e
    data = load_from_disk(str(path))
    splits = [data[name] for name in sorted(data)] if isinstance(data, DatasetDict) else [data]
    yield from _from_rows(path, (record for split in splits for record in split), fields, path.name)


def read_webdataset(path: Path, fields: Fields = Fields()) -> Iterator[Document]:
    """A WebDataset tar: per sample, a ``.json`` record or ``.txt`` text; the sample key is the default id."""

    def document(key: str, parts: dict[str, bytes]) -> Document:
        where = f"{path} sample {key!r}"
        if "json" in parts:
            try:
                record = json.loads(parts["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{where}: invalid JSON ({e})") from e
            return _from_record(record, fields, key, where)
        if "txt" in parts:
            try:
                text = parts["txt"].decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: .txt member is not valid UTF-8 (at byte {e.start})") from None
            _check_not_empty(text, where, ".txt member")
            return Document(id=key, text=text)
        raise ValueError(f"{where}: no .json or .txt member (has {sorted(parts)})")

    key, parts = None, {}
    for name, payload in tar_members(path, path.read_bytes()):
        member_key, _, ext = name.partition(".")
        if member_key != key and parts:
            yield document(key, parts)
            parts = {}
        key, parts[ext] = member_key, payload
    if parts:
        yield document(key, parts)


def _is_hf_disk(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


SUFFIX_READERS = {".jsonl": read_jsonl, ".json": read_jsonl, ".parquet": read_parquet, ".tar": read_webdataset}


def read_documents(paths: list[Path], fields: Fields = Fields()) -> Iterator[Document]:
    """Documents of every file in ``paths`` (directories are walked in sorted order)."""
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
        if path.is_dir() and _is_hf_disk(path):
            yield from read_hf_disk(path, fields)
        elif path.is_dir():
            yield from read_documents(sorted(p for p in path.iterdir() if not p.name.startswith(".")), fields)
        elif path.suffix in SUFFIX_READERS:
            yield from SUFFIX_READERS[path.suffix](path, fields)
        elif path.suffix == ".txt":
            yield from read_text(path)
        else:
            raise ValueError(f"{path}: unsupported input type {path.suffix!r} (jsonl, json lines, txt, parquet, "
                             "WebDataset tar, or a `datasets.save_to_disk` directory)")
