"""Writing a directory (an artifact, a random checkpoint) so that every failure leaves either the old
directory or the new one, whole, under its name (docs/durability.md).

- A lock file beside the output (`.NAME.lock`, flock, removed when done) admits one writer per output
  at a time.
- Files are written into a temporary sibling `.NAME.tmp-XXXXXXXX`, synced to disk, and renamed into
  place only when complete; any exception (Ctrl-C, SIGTERM, a full disk) removes it.
- `--force` swaps the new directory with the old one in one step (Linux renameat2 RENAME_EXCHANGE),
  then deletes the old one; where the exchange is not supported, the old one is renamed aside
  (`.NAME.old-XXXXXXXX`), the new one renamed in, then the old one deleted.
- What a SIGKILL or a power cut leaves (a temporary or set-aside sibling) the next writer to the same
  output removes, after putting a set-aside old directory back if the new one never got its name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path

from runtime.errors import file_error

_TMP, _OLD = ".tmp-", ".old-"


def lock_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


@contextlib.contextmanager
def output_lock(out_dir: Path, kind: str = "artifact"):
    """Hold the output's lock file for the block; refuse at once if another writer holds it. The holder
    deletes the file when done; a writer that locked a file already deleted (or replaced) tries again, so
    two writers never hold different files of one name. A killed holder leaves an unlocked file: free."""
    out_dir = Path(out_dir)
    path = lock_path(out_dir)
    while True:
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise file_error(out_dir.parent, f"cannot create the {kind} directory here ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise file_error(out_dir, f"another hsc is writing this {kind} now (it holds {path.name}); wait "
                                      "for it to finish or choose another output") from None
        if _same_file(fd, path):
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # closing releases the lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _leftovers(out_dir: Path, kind: str) -> list[Path]:
    # mkdtemp's suffix: 8 characters of [a-z0-9_]; a different output's siblings never match
    pattern = re.compile(re.escape(f".{out_dir.name}{kind}") + r"[a-z0-9_]{8}")
    return sorted(p for p in out_dir.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()
                  and not p.is_symlink())


def clear_leftovers(out_dir: Path, log=print) -> None:
    """Call with the lock held: remove what killed writers to `out_dir` left (temporary and set-aside
    siblings), first renaming a set-aside old directory back if `out_dir` itself is missing."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return
    old = _leftovers(out_dir, _OLD)
    if old and not out_dir.exists() and not out_dir.is_symlink():
        os.rename(old[-1], out_dir)
        log(f"restored {out_dir} from {old[-1].name}, set aside by a --force replacement that was killed")
        old = old[:-1]
    for p in _leftovers(out_dir, _TMP) + old:
        shutil.rmtree(p)
        log(f"removed {p}, left by an interrupted write to {out_dir}")


def make_temp(out_dir: Path, kind: str = "artifact") -> Path:
    """A new, empty temporary sibling of out_dir (same filesystem, so the final rename is atomic)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{_TMP}", dir=out_dir.parent))
    except OSError as e:  # the parent is a file, or not writable
        raise file_error(out_dir.parent, f"cannot create the {kind} directory here ({e.strerror or e})") from None


def write_error(out_dir: Path, e: OSError):
    """The one line for an OSError while writing out_dir (a full disk, a vanished mount), once the temporary
    directory is removed."""
    where = f" ({e.filename})" if e.filename else ""
    return file_error(out_dir, f"not written: {e.strerror or e}{where}; nothing was left behind")


def sync_tree(directory: Path) -> None:
    """fsync every file of `directory` and the directory itself: after the rename, a power cut cannot
    leave a name pointing at data that never reached the disk."""
    for p in directory.rglob("*"):
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _sync_dir(directory)


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, out_dir: Path) -> None:
    """Give the complete directory `tmp` the name `out_dir`, replacing an existing one atomically."""
    tmp.chmod(0o755)  # mkdtemp makes it private; an artifact or checkpoint is meant to be shared
    sync_tree(tmp)
    if not out_dir.exists():
        os.rename(tmp, out_dir)
    elif _exchange(tmp, out_dir):  # out_dir is now the new directory, tmp the old one
        if tmp.is_symlink():  # the output was a symlink to a directory: the link goes, its target stays
            tmp.unlink()
        else:
            shutil.rmtree(tmp)
    else:
        # a unique name the next writer recognises; renaming a directory onto an empty one replaces it
        aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{_OLD}", dir=out_dir.parent))
        try:
            os.rename(out_dir, aside)
            os.rename(tmp, out_dir)
        except BaseException:  # interrupted: the old one goes back, unless the new one got its name
            if out_dir.exists():
                shutil.rmtree(aside, ignore_errors=True)  # the old one, or the empty placeholder
            else:
                os.rename(aside, out_dir)
            raise
        shutil.rmtree(aside)
    _sync_dir(out_dir.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not supported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
