"""The files a training run writes into its log directory: TorchRL scalar logs (which
``esper-soa plot`` reads and a resume trims back to its checkpoint) and atomic checkpoints."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

METRICS_DIR = "metrics"  # TorchRL CSVLogger experiment: LOG_DIR/metrics/scalars/<name>.csv ("frames,value")


def run_loggers(log_dir: Path) -> list[Any]:
    """TorchRL loggers of a run: CSV (always; what ``esper-soa plot`` reads) and TensorBoard
    (``LOG_DIR/tensorboard``) when the ``tensorboard`` package is installed."""
    import importlib.util

    from torchrl.record.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(METRICS_DIR, log_dir=str(log_dir))]
    if importlib.util.find_spec("tensorboard") is not None:
        from torchrl.record.loggers import TensorboardLogger

        loggers.append(TensorboardLogger("tensorboard", log_dir=str(log_dir)))
    return loggers


def log_row(loggers: Sequence[Any], row: Mapping[str, Any]) -> None:
    """Every numeric metric of one update, against the frames seen so far (None = undefined, skipped)."""
    step = int(row["frames"])
    for name, value in row.items():
        if value is not None and name != "frames":
            for logger in loggers:
                logger.log_scalar(name, float(value), step=step)


def trim_scalars(scalars_dir: Path, last_step: int) -> None:
    """Cut every CSV scalar log (TorchRL ``CSVLogger``: ``step,value`` lines, step = frames) back
    to the steps ``<= last_step`` (the checkpoint being resumed), so a resumed run's logs equal an
    uninterrupted run's even when the killed run logged updates after its last checkpoint. A torn
    last line (a kill mid-write) goes too; each file is rewritten atomically, and only if it
    changes. (TensorBoard event files are append-only and are not trimmed.)"""
    for path in sorted(scalars_dir.glob("*.csv")) if scalars_dir.is_dir() else ():
        text = path.read_text()
        keep = []
        for line in text.splitlines(keepends=True):
            try:
                if line.endswith("\n") and int(line.split(",", 1)[0]) <= last_step:
                    keep.append(line)
            except ValueError:
                pass  # not a complete row
        if "".join(keep) != text:
            tmp = path.with_suffix(".csv.tmp")
            tmp.write_text("".join(keep))
            tmp.replace(path)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path) -> Path:
    """``torch.save`` atomically: a temp file, flushed and fsynced, then renamed over ``path`` (and
    the directory fsynced), so a crash leaves the old file or the new one, never a torn one; the
    temp file is removed if writing fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path
