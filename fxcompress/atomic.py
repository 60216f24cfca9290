"""Atomic file writes: a result file is either complete or absent, never half-written.

A write goes to a temporary file beside its target, is flushed to disk (``fsync``) and
then renamed over the target. The temporary name carries the writer's process id, so a
write killed before its rename (``SIGKILL``, a power cut) leaves an orphan that the next
write of the same target removes: the writer is gone, and nothing else can finish it.
Scratch folders (:func:`scratch_dir`) follow the same rule in the system's temp directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

SCRATCH_PREFIX = "fxcompress-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    Example:
        >>> with atomic_path("/tmp/fxcompress-example.txt") as tmp:
        ...     _ = tmp.write_text("done")
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=suffix or target.suffix,
                                dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; a result file gets the usual mode
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder to write into; on success its files move into ``target`` (made if
    need be), so ``target`` gets every file or none of them.

    Example:
        >>> with staged_dir("/tmp/fxcompress-example") as stage:
        ...     _ = (stage / "results.json").write_text("{}")
    """
    target = Path(target).absolute()
    home = target if target.is_dir() else target.parent  # the stage lies on target's file system
    home.mkdir(parents=True, exist_ok=True)
    remove_orphans(target, home)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=home))
    try:
        yield stage
        target.mkdir(exist_ok=True)
        for path in stage.iterdir():
            os.replace(path, target / path.name)
        _fsync(target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def remove_orphans(target: Path, home: Path | None = None) -> list[Path]:
    """Delete what earlier writes of ``target`` left in ``home`` (its folder) when their writer died."""
    removed = []
    for candidate in (home or target.parent).glob(f".{_glob_escape(target.name)}.*"):
        if _dead_writer(candidate.name[len(target.name) + 2:]):
            shutil.rmtree(candidate, ignore_errors=True) if candidate.is_dir() else candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A private temporary folder, removed on exit; those of dead processes are removed first."""
    root = Path(tempfile.gettempdir())
    for candidate in root.glob(f"{SCRATCH_PREFIX}*"):
        if candidate.is_dir() and _dead_writer(candidate.name[len(SCRATCH_PREFIX):]):
            shutil.rmtree(candidate, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}.") as folder:
        yield Path(folder)


def _dead_writer(rest: str) -> bool:
    """Whether ``<pid>.<random>…`` names a process that no longer exists."""
    pid = rest.split(".", 1)[0]
    if not pid.isdigit():
        return False  # not one of ours
    try:
        os.kill(int(pid), 0)  # PermissionError: alive, another user's
    except (ProcessLookupError, OverflowError):  # gone, or a number no process can have
        return True
    except PermissionError:
        pass
    return False


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and directories on some platforms) cannot be synced
        pass
    finally:
        os.close(fd)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
