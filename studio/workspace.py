"""What a visitor may touch: the studio's workspace and the roots it may read.

The studio is a server: a visitor must never read, write or delete outside what the studio
gives them. So

* everything the app writes lives in one workspace (``LLRC_STUDIO_WORKSPACE``, default
  ``out/studio`` in the project): each browser session gets its own folder
  (``sessions/<id>/``, uploads and exports inside it), the comparison cells and caches are
  shared studio-written folders beside them;
* an export goes only into the session's ``exports/`` folder, by name, and "Replace" applies
  only to folders the studio itself wrote (a marker file beside each one);
* model folders and calibration files are read only from the allowed roots: the workspace,
  the project's ``assets/`` (the demo model), ``../shared/data``, the Hugging Face cache and
  the folders the operator lists in ``LLRC_STUDIO_ALLOWED_ROOTS`` (``os.pathsep``-separated).
  A path is resolved (``..`` and symlinks) before the check; Hub ids still work.

The CLI never uses this module: it acts for the user who runs it.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path

import psutil

from llrc_core.errors import LLRCError
from llrc_core.models import _looks_local

ROOT = Path(__file__).resolve().parents[1]
MARK = ".llrc-studio"                      # suffix of the marker beside a studio-written folder
UPLOAD_LIMIT_MB = 20                       # also Streamlit's server.maxUploadSize (config.toml)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_TOKEN = re.compile(r"[0-9a-f]{32}")       # a session id: 128 random bits, hex
STARTED = psutil.Process().create_time()   # this server process's start (survives reloads)


class PathRefused(LLRCError):
    """A path outside what the studio gives a visitor."""


def workspace() -> Path:
    return Path(os.environ.get("LLRC_STUDIO_WORKSPACE") or ROOT / "out" / "studio").resolve()


def allowed_roots() -> list[Path]:
    from huggingface_hub import constants
    roots = [workspace(), ROOT / "assets", ROOT.parent / "shared" / "data",
             Path(constants.HF_HUB_CACHE)]
    extra = os.environ.get("LLRC_STUDIO_ALLOWED_ROOTS", "")
    roots += [Path(p) for p in extra.split(os.pathsep) if p.strip()]
    return [r.expanduser().resolve() for r in roots]


def readable(path: str | Path, what: str = "path") -> Path:
    """``path`` resolved, if it lies inside an allowed root; else ``PathRefused`` naming them."""
    resolved = Path(path).expanduser().resolve()          # follows symlinks, removes ..
    roots = allowed_roots()
    if not any(resolved.is_relative_to(r) for r in roots):
        raise PathRefused(f"the {what} {str(path)!r} is outside the folders this studio may "
                          f"read ({', '.join(map(str, roots))}); put it in one of them, or ask "
                          "the operator to add its folder to LLRC_STUDIO_ALLOWED_ROOTS")
    return resolved


def model_source(text: str) -> str:
    """A Hub id, or a local folder inside an allowed root, as given (else ``PathRefused``)."""
    if _looks_local(text):
        readable(text, "model folder")
    return text


def new_session_id() -> str:
    """An unguessable session id (it names the session's folder and travels in its URL)."""
    return secrets.token_hex(16)


def valid_session_id(text) -> bool:
    """Exactly what ``new_session_id`` makes: nothing else may name a session folder."""
    return isinstance(text, str) and _TOKEN.fullmatch(text) is not None


def session_dir(session_id: str) -> Path:
    """This browser session's own folder in the workspace (made on first use)."""
    if not valid_session_id(session_id):
        raise PathRefused(f"bad session id {session_id!r}")
    folder = workspace() / "sessions" / session_id
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def export_folder(session_id: str, name: str) -> Path:
    """Where an export named ``name`` goes: only inside the session's ``exports/``."""
    name = name.strip()
    if not _NAME.fullmatch(name) or ".." in name:
        raise PathRefused(f"export name {name!r} is not a plain folder name: use letters, digits, "
                          "'.', '_' and '-' (exports go into your session's workspace folder)")
    return session_dir(session_id) / "exports" / name


def marker(folder: Path) -> Path:
    return folder.parent / f".{folder.name}{MARK}"


def check_replace(folder: Path, replace: bool) -> None:
    """A non-empty ``folder`` may be replaced only when asked and only if the studio wrote it."""
    if folder.exists() and any(folder.iterdir()):
        if not replace:
            raise FileExistsError(f"{folder.name!r} already holds an export; choose another name "
                                  "or tick 'Replace the folder if it is not empty'")
        if not marker(folder).exists():
            raise PathRefused(f"{folder.name!r} was not written by this studio: it is never "
                              "replaced; choose another name")


def mark(folder: Path) -> None:
    """Record that the studio wrote ``folder`` (so a later "Replace" may delete it)."""
    marker(folder).write_text("written by LLRC Studio\n")


def sweep_partial(exports: Path) -> list[Path]:
    """Remove what an export killed mid-way left in ``exports`` (``files.atomic_folder``'s
    hidden ``.<name>.tmp-*`` and ``.<name>.old-*`` siblings) from before this server started:
    an export of this server may still be writing its own. Returns what was removed."""
    gone = []
    for path in exports.glob(".*"):
        if (path.is_dir() and not path.is_symlink() and re.search(r"\.(tmp|old)-", path.name)
                and path.stat().st_mtime < STARTED):
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
    return gone
