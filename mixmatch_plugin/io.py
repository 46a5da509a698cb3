"""Atomic file output and safe loading.

Everything the plugin writes goes through :func:`atomic_write_bytes`: a temp file in the same folder
(:func:`tempfile.NamedTemporaryFile`), ``fsync``, then :func:`os.replace`, so an interrupted run never
leaves a half-written file where a good one was expected; the temp file is removed when the write
fails or is interrupted (a process killed outright may leave one behind, named ``.<target>.*.tmp``).
Checkpoints are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import MixMatchError, first_line

logger = logging.getLogger(__name__)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; create parent folders as needed.

    The file keeps the permission bits of the one it replaces (a new one gets ``0o644``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as fh:
        try:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), mode)  # NamedTemporaryFile creates 0600
        except BaseException:
            fh.close()
            os.unlink(fh.name)
            raise
    try:
        os.replace(fh.name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fh.name)
        raise
    logger.debug("wrote %s (%d bytes)", path, len(data))
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Serialise ``obj`` as indented JSON and write it atomically.

    ``allow_nan=False``: a NaN in a result is a bug upstream, and JSON readers other than Python's
    would reject the file anyway.
    """
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save`` to a temp file, then rename it over ``path``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Read a JSON file, turning missing files and syntax errors into one-line errors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MixMatchError(f"{what} {path} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MixMatchError(f"cannot read {what} {path}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MixMatchError(
            f"{what} {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "it may be truncated: regenerate it"
        ) from None


def safe_torch_load(path: str | os.PathLike[str]) -> Any:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, never code."""
    path = Path(path)
    if not path.exists():
        raise MixMatchError(f"checkpoint {path} does not exist; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError ... for bad files
        raise MixMatchError(
            f"refusing to load checkpoint {path}: it is not a plain weights file loadable with "
            f"weights_only=True ({first_line(exc)}); save a state_dict with torch.save(model.state_dict(), path)"
        ) from None
