"""Checkpoint files: atomic writes, integrity check, fallback to the previous good one.

A run's checkpoints live in ``{checkpoint_root}/{experiment}/{spec_hash}/``:
``last.pt`` (full training state), ``last.prev.pt`` (the one before), ``best.pt`` (model weights of the
best validation mIoU). Each file has a ``.sha256`` sidecar written after the file itself; a file whose
digest does not match (truncated, corrupted, half-written) is never loaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch


class CorruptCheckpoint(RuntimeError):
    pass


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(state: dict[str, Any], path: Path, keep_previous: bool = False) -> None:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename), then its digest.

    With ``keep_previous`` the current file (if its digest file exists) becomes ``<stem>.prev<suffix>``
    first, as a hard link (a copy where links are unsupported) followed by its digest. A crash at any
    step leaves at least one of the two files with a matching digest: the previous one is complete
    before the current one is replaced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    digest = _digest(tmp)
    side = _sidecar(path)
    if keep_previous and path.exists() and side.exists():
        prev = path.with_name(path.stem + ".prev" + path.suffix)
        _sidecar(prev).unlink(missing_ok=True)  # from here prev is invalid, path still valid
        prev.unlink(missing_ok=True)
        try:
            os.link(path, prev)
        except OSError:
            shutil.copyfile(path, prev)
        _write_atomic(_sidecar(prev), side.read_text())  # both valid
    os.replace(tmp, path)  # path invalid (old digest) until its digest is replaced; prev valid
    _write_atomic(side, digest)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint after checking its digest; raises CorruptCheckpoint on any mismatch."""
    side = path.with_name(path.name + ".sha256")
    if not side.exists():
        raise CorruptCheckpoint(f"{path}: no digest file (write was interrupted)")
    if _digest(path) != side.read_text().strip():
        raise CorruptCheckpoint(f"{path}: digest mismatch (file truncated or corrupted)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CorruptCheckpoint(f"{path}: cannot be read: {err}") from err


def load_latest(folder: Path, map_location: str | torch.device = "cpu") -> tuple[dict | None, list[str]]:
    """The newest good training state in ``folder`` (last, then last.prev) and warnings about bad ones."""
    notes = []
    for name in ("last.pt", "last.prev.pt"):
        path = folder / name
        if not path.exists():
            continue
        try:
            return load(path, map_location), notes
        except CorruptCheckpoint as err:
            notes.append(str(err))
            warnings.warn(f"skipping unusable checkpoint: {err}", stacklevel=2)
    return None, notes
