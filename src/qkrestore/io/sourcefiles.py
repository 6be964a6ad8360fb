"""The files of an input folder that may be read or copied, for folders the user did not make.

A PRE or POST folder can come from anywhere. Two things in it must never pass through: a symbolic
link that leaves the folder (``notes.txt -> /etc/passwd`` would be copied into OUT as a plain file,
ready to be pushed to the Hub) and anything that is not a regular file (reading a FIFO blocks
forever; a device file is not model data).

A link is followed only where it resolves inside the folder itself or inside the Hugging Face cache
entry the folder belongs to: a snapshot folder ``…/models--org--name/snapshots/<rev>/`` holds links
to ``../../blobs/<hash>``, and those are the model's own files. Everything else is refused with one
line naming the path (see docs/safety.md for why refusing beats skipping).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import CheckpointError

# Folder names the Hub cache uses for a repo entry (huggingface_hub's repo_folder_name).
_CACHE_ENTRY_PREFIXES = ("models--", "datasets--", "spaces--")


def trusted_roots(root: Path) -> list[Path]:
    """Where links in ``root`` may point: the folder itself, and its HF cache entry if any."""
    real = Path(os.path.realpath(root))
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(
        _CACHE_ENTRY_PREFIXES
    ):
        roots.append(real.parent.parent)
    return roots


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def checked_file(root: Path, rel: str | os.PathLike[str]) -> Path:
    """``root / rel`` if it is a regular file reached without leaving the trusted places.

    Raises :class:`CheckpointError` naming the path otherwise. A missing file is returned as is
    (callers report absence in their own words).
    """
    path = Path(root) / rel
    roots = trusted_roots(Path(root))
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        return path
    real = Path(os.path.realpath(path))
    if not _inside(real, roots):
        raise CheckpointError(
            f"{path}: a symbolic link to {real}, outside the folder; qkrestore follows links only "
            "inside the folder or its Hugging Face cache entry",
            hint="replace the link with a copy of the file, or remove it",
        )
    try:
        st = os.stat(path)
    except OSError:
        raise CheckpointError(
            f"{path}: a broken symbolic link", hint="remove it or restore its target"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        what = _kind(st.st_mode)
        via = " (through a symbolic link)" if stat.S_ISLNK(lst.st_mode) else ""
        raise CheckpointError(
            f"{path}: {what}{via}; qkrestore reads and copies only regular files",
            hint="remove it from the folder",
        )
    return path


def folder_files(root: Path) -> list[str]:
    """Every file of ``root`` to consider for copying (relative POSIX paths, sorted), all checked.

    Hidden folders (``.git``, ``.cache``) are tool state and are not entered. A link to a folder
    inside the trusted places is entered like a folder; any other entry must pass
    :func:`checked_file`.
    """
    root = Path(root)
    roots = trusted_roots(root)
    out: list[str] = []
    seen: set[Path] = set()

    def walk(folder: Path, prefix: str) -> None:
        real = Path(os.path.realpath(folder))
        if real in seen:  # a link loop, or two links to one folder
            return
        seen.add(real)
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            rel = f"{prefix}{entry.name}"
            if entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                continue
            if entry.is_symlink():
                target = Path(os.path.realpath(entry.path))
                if target.is_dir() and _inside(target, roots):
                    if entry.name.startswith("."):
                        continue
                    walk(Path(entry.path), rel + "/")
                    continue
            elif entry.is_dir(follow_symlinks=False):
                walk(Path(entry.path), rel + "/")
                continue
            checked_file(root, rel)
            out.append(rel)

    walk(root, "")
    return out
