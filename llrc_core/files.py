"""Writing files so that a reader never sees half of one: every file the package writes goes
through ``atomic_write`` (a temporary sibling, then ``os.replace``), every output folder
through ``atomic_folder`` (a temporary sibling folder, moved into place when complete);
``prepare_destination`` checks an output folder before any work."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place; on
    any error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_json(path: str | Path, obj) -> Path:
    return atomic_text(path, json.dumps(obj, indent=1, default=str))


def prepare_destination(out: str | Path, force: bool, fix: str = "pass --force") -> None:
    """Refuse an output folder that is a file, or not empty without ``force``; ``fix`` says
    how to allow replacing it in the caller's words (the CLI's flag, the app's checkbox)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"destination {str(out)!r} is a file; choose a folder path")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"destination {str(out)!r} exists and is not empty; choose another "
                              f"folder or {fix} to replace it")


def atomic_folder(out: str | Path, fill: Callable[[Path], object], force: bool = False) -> Path:
    """Call ``fill(tmp)`` on a temporary sibling folder of ``out``, then move it into place;
    with ``force`` an existing ``out`` is replaced only once the new one is complete. On any
    error (or interrupt) nothing half-written is left and an old ``out`` is intact."""
    out = Path(out).expanduser().absolute()
    prepare_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        fill(tmp)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (allowed by ``force``) is moved aside
    first and deleted only once the new folder is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
