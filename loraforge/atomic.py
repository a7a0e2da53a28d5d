"""Files that are either there whole or not at all, even across a crash or a power loss.

A file is written under a temporary name in its own folder, flushed and fsynced, renamed over the final name,
and the folder is fsynced so that the rename itself is on disk. A folder of files that belong together (an
adapter's weights and its config, a checkpoint) is written the same way as a whole: built aside, every file
fsynced, then swapped in (`publish_folder`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list: what makes a rename durable). No-op where unsupported."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (and Windows folders) cannot fsync a folder
    finally:
        os.close(fd)


def write_file(path: Path, write: Callable[[Path], None], mode: int | None = 0o644) -> None:
    """Call write(temp_path), then make the result `path` atomically and durably. On failure (a full disk, an
    exception in `write`) the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        if mode is not None:
            tmp.chmod(mode)  # mkstemp makes it private; results are meant to be read by others
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_text(path: Path, text: str) -> None:
    write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def new_folder_beside(final: Path) -> Path:
    """An empty temporary folder next to `final` (same file system, so it can be renamed into place)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))


def publish_folder(tmp: Path, final: Path) -> None:
    """Make the finished folder `tmp` become `final`, all its files at once: fsync them, then swap. An old `final`
    is renamed aside first and removed after; a crash between the two renames leaves it as `.NAME.old`, which
    `recover_folder` puts back."""
    for file in sorted(tmp.rglob("*")):
        fsync_path(file)
    fsync_path(tmp)
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_folder(final: Path, fill: Callable[[Path], None]) -> None:
    """Call fill(temp_folder), then make it `final`, all its files at once (publish_folder). On failure the
    temporary folder is removed and `final` is untouched."""
    tmp = new_folder_beside(final)
    try:
        fill(tmp)
        publish_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_folder(final: Path) -> None:
    """After a crash inside publish_folder: the previous folder back in place when the new one never arrived."""
    old = final.parent / f".{final.name}.old"
    if old.exists() and not final.exists():
        os.replace(old, final)
        fsync_path(final.parent)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
