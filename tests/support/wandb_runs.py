"""What an offline wandb run wrote, read back from its ``run-<id>.wandb`` transaction log.

wandb 0.31 no longer ships a Python reader (its ``sdk.internal.datastore`` moved into the Go ``wandb-core``),
so this follows the documented framing (a ``:W&B`` header, then LevelDB-log blocks of 32 KiB with 7-byte
chunk headers) and decodes each record with wandb's own protobuf, ``wandb.proto.wandb_internal_pb2.Record``.
A run SIGKILLed mid-write can end in a torn chunk: reading stops there.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER = struct.Struct("<4sHB")  # ident, magic, version
CHUNK = struct.Struct("<IHB")  # crc32c, length, type
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """One offline run directory: its id, group, name, config, history rows and summary."""

    path: Path
    run_id: str = ""
    group: str = ""
    name: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one dict per row, with "_step"
    summary: dict = field(default_factory=dict)


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    ident, magic, version = HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a wandb transaction log"
    records, pending, pos = [], b"", HEADER.size
    while pos + CHUNK.size <= len(data):
        if BLOCK - pos % BLOCK < CHUNK.size:  # the tail of a block too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = CHUNK.unpack_from(data, pos)
        payload = data[pos + CHUNK.size:pos + CHUNK.size + length]
        if kind == 0 or len(payload) < length:  # zero padding or a torn write
            break
        pos += CHUNK.size + length
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            records.append(pending)
    return records


def _value(item) -> object:
    return json.loads(item.value_json)


def read_offline_run(directory: Path) -> OfflineRun:
    """Decode the run's records: run (id, group, name), config, history rows, summary."""
    (log,) = directory.glob("run-*.wandb")
    run = OfflineRun(directory)
    for raw in _records(log):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.group, run.name = record.run.run_id, record.run.run_group, record.run.display_name
            run.config.update({i.key: _value(i) for i in record.run.config.update})
        elif kind == "config":
            run.config.update({i.key: _value(i) for i in record.config.update})
        elif kind == "history":
            run.history.append({"/".join(i.nested_key) if i.nested_key else i.key: _value(i)
                                for i in record.history.item})
        elif kind == "summary":
            run.summary.update({"/".join(i.nested_key) if i.nested_key else i.key: _value(i)
                                for i in record.summary.update})
    return run


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    """Every offline wandb run under ``run_dir``, oldest first."""
    return [read_offline_run(d) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]
