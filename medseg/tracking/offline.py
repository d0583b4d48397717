"""Reading W&B run files without W&B's servers: the ``run-*.wandb`` transaction log that every run (offline or
online) keeps under ``<run dir>/wandb/``. No medseg imports: `medseg.report` and the tests read runs through it."""

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A `.wandb` file is a leveldb-style log (github.com/google/leveldb/blob/main/doc/log_format.md) of protobuf
# `wandb_internal_pb2.Record`s: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of
# records, each with a 7-byte header (crc32, length, type FULL/FIRST/MIDDLE/LAST); a record longer than what
# is left in a block continues in the next, and a block tail under 7 bytes is zero padding. wandb 0.31 reads
# these in Go only (wandb-core), so this is the Python side.
_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> Iterator[Any]:
    """The ``wandb_internal_pb2.Record`` messages of a ``run-*.wandb`` file, in order; a torn tail (a run still
    writing, or killed) ends the iteration."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a W&B transaction log (header {data[:_HEADER]!r})")
    pos, parts = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if len(chunk) < length:
            return
        if kind in (_FULL, _FIRST):
            parts = chunk
        elif kind in (_MIDDLE, _LAST):
            parts += chunk
        else:
            continue  # zero padding
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """What a ``.wandb`` file holds, as plain Python: ``history`` rows (dicts keyed like ``run.log``), the
    final ``summary``, the ``config`` (nested dicts), the run's ``name``/``group``/``job_type``/``tags`` and the
    ``metrics`` definitions (name or glob -> step metric)."""

    path: Path
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)


def offline_run_file(run_dir: str | Path) -> Path | None:
    """The newest ``run-*.wandb`` under ``<run_dir>/wandb`` (offline or online runs both keep one)."""
    files = sorted(Path(run_dir).glob("wandb/*run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def read_offline_run(path: str | Path) -> OfflineRun:
    """Read a ``run-*.wandb`` file, or the newest one of a run directory."""
    path = Path(path)
    if path.is_dir():
        found = offline_run_file(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no wandb/*run-*/run-*.wandb file")
        path = found
    run = OfflineRun(path=path)

    def update(target: dict[str, Any], items: Any, nest: bool = True) -> None:
        for item in items:
            value = json.loads(item.value_json)
            if item.key or not nest:
                target[_item_key(item)] = value
                continue
            *parents, last = item.nested_key  # e.g. ("_wandb", "visualize", "<chart key>")
            node = target
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = value

    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.name, run.group, run.job_type, run.tags = r.display_name, r.run_group, r.job_type, list(r.tags)
            update(run.config, r.config.update)
        elif kind == "config":
            update(run.config, record.config.update)
            for item in record.config.remove:
                run.config.pop(_item_key(item), None)
        elif kind == "history":
            row: dict[str, Any] = {}
            update(row, record.history.item, nest=False)  # flat, as logged: "val/examples/_type"
            run.history.append(row)
        elif kind == "summary":
            update(run.summary, record.summary.update, nest=False)
        elif kind == "metric":
            run.metrics[record.metric.name or record.metric.glob_name] = record.metric.step_metric
    return run
