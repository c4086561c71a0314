"""Where the harness keeps what it can recompute (numba's compiled kernels, Keras' initial
weights): a folder per kind under the user's cache directory, else the temporary directory
when the home directory is not writable (a Ray worker or a CI runner without one)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def cache_dir(name: str, leaf: str, override: str | None = None) -> Path:
    """``<base>/<leaf>``, created if missing, for the first writable base among ``override``
    (a folder the user named), ``$XDG_CACHE_HOME/<name>`` (``~/.cache/<name>``) and
    ``<tempdir>/<name>-<uid>``. OSError when none is writable."""
    if override:
        candidates = [Path(override)]
    else:
        home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        uid = os.getuid() if hasattr(os, "getuid") else 0
        candidates = [home / name, Path(tempfile.gettempdir()) / f"{name}-{uid}"]
    for base in candidates:
        try:
            (base / leaf).mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(base / leaf, os.W_OK | os.X_OK):
            return base / leaf
    raise OSError(f"no writable cache directory among {', '.join(map(str, candidates))}")


def save_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write`` a file through a temporary beside ``path``, then rename it there: whole or not
    at all, whoever else writes the same key. A cache that can't be written is only slower:
    OSError is swallowed."""
    try:
        handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # a full disk leaves no half-written temporary behind
