"""Readers turning corpora (JSONL, text, parquet, WebDataset tars, `datasets.load_from_disk`, and
`datasets.load_dataset` sources) into documents.

Local paths are read as they are; a `load_dataset` source is a builder over local files (json, parquet,
text, csv) or a hub name, which downloads on a connected machine only. Errors name the file and line or
row. An empty
(or whitespace-only) document is refused rather than skipped: it would train on nothing but an
end-of-document token, and it usually means the wrong --text-field or a broken export.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from itertools import islice
from pathlib import Path

from megatron_sgtm.errors import load_yaml


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


def _from_rows(where: object, records: Iterable[dict], fields: Fields, stem: str) -> Iterator[Document]:
    for row, record in enumerate(records):
        yield _from_record(record, fields, f"{stem}-{row}", f"{where} row {row}")


def read_parquet(path: Path, fields: Fields = Fields()) -> Iterator[Document]:
    import pyarrow.parquet as pq

    batches = pq.ParquetFile(path).iter_batches()
    yield from _from_rows(path, (record for batch in batches for record in batch.to_pylist()), fields, path.stem)


def read_hf_disk(path: Path, fields: Fields = Fields()) -> Iterator[Document]:
    """A dataset saved with ``datasets.save_to_disk``."""
    from datasets import DatasetDict, load_from_disk

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

    import tarfile

    import webdataset as wds

    samples = wds.WebDataset([str(path)], shardshuffle=False, empty_check=False)
    try:
        for sample in samples:
            yield document(sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")})
    except tarfile.TarError as e:
        raise ValueError(f"{path}: not a readable tar ({str(e).split(' @ ')[0]})") from e


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


@dataclass(frozen=True)
class HubSource:
    """A `datasets.load_dataset` source: a hub name (on a connected machine) or a builder over local files
    (``json``, ``parquet``, ``text``, ``csv`` with ``data_files`` globs). ``streaming`` reads records as
    they come, for corpora larger than memory or disk. ``category`` labels every document of the source
    (e.g. the language of a monolingual set) instead of ``category_field``; ``limit`` keeps the first N."""

    dataset: str
    config: str | None = None
    data_files: list[str] = field(default_factory=list)
    split: str = "train"
    streaming: bool = False
    id_field: str = "id"
    text_field: str = "text"
    category_field: str = "category"
    category: str | None = None
    limit: int | None = None

    @property
    def label(self) -> str:
        return f"{self.dataset}[{self.split}]"


def read_hub(source: HubSource) -> Iterator[Document]:
    """Documents of a `load_dataset` source; default ids are ``<dataset>[-<config>]-<split>-<row>``."""
    import glob

    from datasets import load_dataset

    for pattern in source.data_files:  # datasets 5.2 fails with a bare StopIteration when a glob matches nothing
        if "://" not in pattern and not glob.glob(pattern, recursive=True):
            raise FileNotFoundError(f"{source.label}: data_files {pattern!r} matches no file")
    try:
        data = load_dataset(source.dataset, source.config, data_files=source.data_files or None,
                            split=source.split, streaming=source.streaming)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise ValueError(f"load_dataset({source.dataset!r}, split={source.split!r}): {e}") from e
    fields_ = Fields(id=source.id_field, text=source.text_field, category=source.category_field)
    stem = "-".join([source.dataset.replace("/", "_"), *([source.config] if source.config else []), source.split])
    for doc in _from_rows(source.label, islice(data, source.limit), fields_, stem):
        yield doc if source.category is None else replace(doc, category=source.category)


def load_recipe(path: Path) -> list[HubSource]:
    """A data recipe: YAML ``sources:``, a list of `HubSource` fields (``dataset`` required)."""
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    raw = load_yaml(path) or {}
    entries = raw.get("sources") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected 'sources:', a non-empty list of load_dataset sources")
    known = {f.name for f in dataclass_fields(HubSource)}
    sources = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("dataset"), str):
            raise ValueError(f"{path}: sources[{i}]: expected a mapping with 'dataset' (a hub name or builder)")
        if unknown := sorted(set(entry) - known):
            raise ValueError(f"{path}: sources[{i}]: unknown key(s) {unknown}; known: {sorted(known)}")
        if isinstance(entry.get("data_files"), str):
            entry = {**entry, "data_files": [entry["data_files"]]}
        sources.append(HubSource(**entry))
    return sources
