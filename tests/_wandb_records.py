"""Read back what an offline W&B run wrote: the records of its `run-<id>.wandb` file.

wandb 0.17+ (wandb-core) keeps an offline run's config, history and summary only in that binary log: a
LevelDB-style log (a 7-byte `:W&B` header, then 32 KiB blocks of records, each `crc32 | length | type`
and a chunk of a `wandb.proto` Record). This reader follows that layout; it skips no record.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["OfflineRun", "read_offline_run", "records"]

_BLOCK = 32768
_HEADER = 7
_FULL, _LAST = 1, 4


def records(path: Path) -> Iterator[Any]:
    """Every `wandb_internal_pb2.Record` of a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B run log"
    pos, chunks = _HEADER, b""
    while pos + _HEADER <= len(raw):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + _HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunks += raw[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """The parts of one offline run the tests check."""

    run_id: str
    group: str
    job_type: str
    name: str
    tags: list[str]
    resume: bool  # resume="allow" (or "must") was asked for
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # the last value of each key
    metrics: dict[str, Any] = field(default_factory=dict)  # define_metric records by name


def read_offline_run(run_dir: Path, wait_s: float = 30.0) -> OfflineRun:
    """`run_dir`: a `wandb/offline-run-<time>-<id>` folder. wandb's service may still be writing the log
    when `finish()` returns, so this waits (up to `wait_s`) for the run's closing `exit` record."""
    (log_file,) = Path(run_dir).glob("run-*.wandb")
    deadline = time.monotonic() + wait_s
    while True:
        kinds = [record.WhichOneof("record_type") for record in records(log_file)]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    run: OfflineRun | None = None
    for record in records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info = record.run
            if run is None:
                run = OfflineRun(
                    info.run_id,
                    info.run_group,
                    info.job_type,
                    info.display_name,
                    list(info.tags),
                    info.resume,
                )
            else:  # a later run update (tags set after init)
                run.tags = list(info.tags)
        elif run is None:
            continue
        elif kind == "config":
            run.config.update({_key(item): json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            run.history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            run.summary.update({_key(item): json.loads(item.value_json) for item in record.summary.update})
        elif kind == "metric":
            run.metrics[record.metric.name or record.metric.glob_name] = record.metric
    assert run is not None, f"no run record in {log_file}"
    return run
