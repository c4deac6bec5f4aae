"""Files written whole or not at all: a killed run never leaves half a JSON or YAML file for the next one to read,
and a directory replaced by `write_dir_atomic` is either the old one or the complete new one."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Hidden siblings of a directory being written: ".{name}{mark}{pid}-{random}". The marks are recognisable, so that
# what a killed run left behind is found, and cleaned up or restored, by the next write into the same directory.
_STAGING = ".pmod-staging-"
_REPLACED = ".pmod-replaced-"
_STALE_AFTER_S = 24 * 3600  # where process ids cannot be checked (not POSIX), leftovers older than this are stale


def check_output_apart(output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None],
                       error: type[Exception], replaces: bool = False) -> None:
    """Refuse an output folder that is one of the ``inputs`` (name -> path; None is skipped) or lies inside one, and,
    for a command that replaces its output whole (``replaces``), one that holds an input: writing it would destroy
    what the command reads. Paths are compared resolved, so links and ``..`` are seen through."""
    out = Path(output).expanduser().resolve()
    for name, source in inputs.items():
        if source is None:
            continue
        src = Path(source).expanduser().resolve()
        if out == src or src in out.parents or (replaces and out in src.parents):
            where = "is" if out == src else "lies inside" if src in out.parents else "holds"
            raise error(f"The output {output} {where} the {name} {source}: writing it would destroy what this command "
                        "reads. Choose an output folder apart from its inputs.")


@contextlib.contextmanager
def output_lock(output: str | os.PathLike, command: str, error: type[Exception]):
    """Hold an exclusive lock on the output folder ``output`` while ``command`` writes it: a second run into the same
    folder is refused at once, naming the one that holds it, instead of both "succeeding" with a mix of their files.
    The lock is an advisory lock (``flock``) on a hidden sibling file, released when the holder ends, however it ends
    (the kernel drops it with the process); the file, and any parent folder made for it, is removed on release.
    Where ``fcntl`` is missing (not POSIX) nothing is locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    output = Path(output)
    check_output_name(output, error)
    created = _make_parents(output.parent)
    path = output.parent / f".{output.name}.pmod-lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            _remove_made(created)
            raise error(f"{output} is being written by another pmod run ({holder}); wait for it to end, or choose "
                        "another output folder.") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break  # the file is still the one at the path (a holder that ended removes it)
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{command}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it: a run that opened it meanwhile sees another inode
        os.close(fd)
        _remove_made(created)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and `os.replace` (removed again if anything fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # unique per call
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(name, 0o666 & ~_umask())  # mkstemp makes 0600; keep what a plain write would give
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path``, atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_dir_atomic(out: str | os.PathLike, write: Callable[[Path], None], replace: bool = True) -> Path:
    """Build a directory with ``write(staging)`` in a hidden sibling of ``out`` and move it to ``out`` when complete.

    An existing ``out`` is replaced by rename-then-delete: it is moved aside, the new directory renamed into place,
    and only then the old one deleted; if anything fails it is put back. The staging directory is removed on
    failure, and one left by a killed earlier run is removed here (see `recover_dir`). The new directory gets the
    permissions of a plain ``mkdir`` under the process's umask. Parent directories are created as needed (and
    removed again if the write fails). With ``replace=False`` only a missing or empty ``out`` is filled: one that
    appeared with content while ``write`` ran is left as it is (`FileExistsError`), never moved aside and deleted.
    """
    out = Path(out)
    created = _make_parents(out.parent)
    try:
        recover_dir(out)
        staging = _new_sibling(out, _STAGING)
        try:
            write(staging)
            _move_into_place(staging, out, replace)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except BaseException:
        _remove_made(created)
        raise
    return out


def recover_dir(out: str | os.PathLike) -> None:
    """Tidy up after a `write_dir_atomic` into ``out`` that was killed (no process of that id runs any more).

    A staging directory is removed. A directory moved aside to be replaced is put back if ``out`` is missing (the
    run died between the two renames), and deleted if ``out`` is there (the new directory was already in place).
    """
    out = Path(out)
    try:
        siblings = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.pmod-")]
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing was written there
    staging = [p for p in siblings if _leftover(p, out, _STAGING)]
    replaced = sorted((p for p in siblings if _leftover(p, out, _REPLACED)), key=_mtime, reverse=True)
    for path in staging:
        logger.warning("Removing %s, left by an interrupted write of %s.", path, out)
        _remove(path)
    for path in replaced:
        if not os.path.lexists(out):
            logger.warning("Restoring %s from %s: an earlier write was interrupted while replacing it.", out, path)
            os.rename(path, out)
        else:
            logger.warning("Removing %s, the previous %s replaced by an interrupted write.", path, out)
            _remove(path)


def _move_into_place(staging: Path, out: Path, replace: bool = True) -> None:
    if not replace:
        try:  # atomic: replaces nothing or an empty directory, fails on anything else
            os.rename(staging, out)
        except OSError as exc:
            raise FileExistsError(f"{out} appeared while it was being written; it was left as it is") from exc
        return
    if not os.path.lexists(out):
        os.rename(staging, out)
        return
    aside = _sibling_name(out, _REPLACED)
    os.rename(out, aside)
    try:
        os.rename(staging, out)
    except BaseException:
        if not os.path.lexists(out):  # (an interrupt may arrive just after the rename succeeded)
            os.rename(aside, out)
        raise
    _remove(aside)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    """Delete a file, link or directory tree; a failure is logged (the next `recover_dir` retries), not raised."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
    except OSError as exc:
        logger.warning("Could not remove %s (%s); delete it by hand.", path, exc)


def check_output_name(out: Path, error: type[Exception]) -> None:
    """Refuse, before any work, an output whose name leaves no room for the hidden siblings written next to it (the
    staging and replaced folders add about 30 characters): it would fail at the end, after the work."""
    try:
        limit = os.pathconf(out.parent if out.parent.exists() else ".", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    longest = max(len(_sibling_name(out, mark).name) for mark in (_STAGING, _REPLACED))
    if longest > limit:
        raise error(f"The output name {out.name[:40]}... is {len(out.name)} characters long; pmod writes hidden "
                    f"folders beside it with {longest - len(out.name)} more, past this file system's limit of {limit}. "
                    "Choose a shorter name.")


def _sibling_name(out: Path, mark: str) -> Path:
    return out.with_name(f".{out.name}{mark}{os.getpid()}-{secrets.token_hex(4)}")


def _new_sibling(out: Path, mark: str) -> Path:
    """A new empty directory next to ``out``, created like ``mkdir`` (mode 0o777 less the umask, not 0o700)."""
    while True:
        path = _sibling_name(out, mark)
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue


def _remove_made(created: list[Path]) -> None:
    """Remove the folders `_make_parents` made (outermost first), innermost first, as far as they are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            break  # not empty: neither are the folders around it


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the ones created, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        created.append(path)
    return created


def _leftover(path: Path, out: Path, mark: str) -> bool:
    """Whether ``path`` is a ``mark`` sibling of ``out`` whose process is gone."""
    prefix = f".{out.name}{mark}"
    if not path.name.startswith(prefix):
        return False
    pid_text = path.name[len(prefix) :].split("-", 1)[0]
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if os.name != "posix":
        return time.time() - _mtime(path) > _STALE_AFTER_S
    if pid == os.getpid():
        return True  # this process is not writing it now: it is left from an earlier, interrupted call
    try:
        os.kill(pid, 0)
    except PermissionError:
        return False  # the process runs (as another user)
    except (ProcessLookupError, OverflowError, ValueError):
        return True
    return False


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0
