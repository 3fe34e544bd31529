"""Readers turning local corpora (JSONL, text, parquet, WebDataset tars, `datasets.load_from_disk`)
into documents.

Nothing is downloaded: every source is a local path. Errors name the file and line or row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
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


def _from_record(record: dict, fields: Fields, default_id: str, where: str) -> Document:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    text = record.get(fields.text)
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {fields.text!r} is missing or not a string")
    doc_id = record.get(fields.id, default_id)
    category = record.get(fields.category)
    return Document(id=str(doc_id), text=text, category=None if category is None else str(category))


def jsonl_records(path: Path) -> Iterator[tuple[int, str, dict]]:
    """(line number, "path:line" for messages, record) of each non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
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
    """Plain text: one document per non-empty line, id ``<stem>-<line>``."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield Document(id=f"{path.stem}-{lineno}", text=line.rstrip("\n"))


def read_parquet(path: Path, fields: Fields = Fields()) -> Iterator[Document]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for record in batch.to_pylist():
            yield _from_record(record, fields, f"{path.stem}-{row}", f"{path} row {row}")
            row += 1


def read_hf_disk(path: Path, fields: Fields = Fields()) -> Iterator[Document]:
    """A dataset saved with ``datasets.save_to_disk`` (the optional `datasets` package)."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as e:
        raise ImportError(f"{path} is a `datasets` directory; install the optional `datasets` package") from e
    data = load_from_disk(str(path))
    splits = [data[name] for name in sorted(data)] if isinstance(data, DatasetDict) else [data]
    row = 0
    for split in splits:
        for record in split:
            yield _from_record(record, fields, f"{path.name}-{row}", f"{path} row {row}")
            row += 1


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
            return Document(id=key, text=parts["txt"].decode("utf-8"))
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
