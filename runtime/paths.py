"""Files named by a file: every path an artifact's manifest or a checkpoint's checklist names must stay
inside that directory, and every file read must be a regular file.

A manifest or checklist comes from whoever made the directory, so a name in it is untrusted: an
absolute path, a `..` or a symlink leading out would let it make hsc read (hash, size, load) any file
the user can read, and a FIFO or device would block the read forever. Such a name is refused with one
line that says nothing about the outside file (not whether it exists, its size or its hash).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

from runtime.errors import file_error


def confined(directory: Path, name: str, what: str = "directory", must_exist: bool = True) -> Path:
    """`directory / name`, once checked to stay inside `directory`: `name` is relative, has no `..`, no
    symlink on the way leads out of `directory`, and (must_exist) it is a regular file. Raises HscError
    naming `directory / name` and the problem; `what` names the directory in that line (artifact,
    checkpoint)."""
    directory = Path(directory)
    shown = directory / str(name)
    if not isinstance(name, str) or not name or "\0" in name:
        raise file_error(directory, f"names a file {name!r} that is not a plain relative path (refused)")
    if (PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive
            or ".." in PurePosixPath(name.replace("\\", "/")).parts):
        raise file_error(directory, f"names {name!r}, a path outside the {what} (refused: only names inside it "
                                    "are read)")
    try:
        root = directory.resolve(strict=True)
        real = shown.resolve()  # follows every symlink; the target is not opened, so nothing blocks
    except (OSError, RuntimeError) as e:  # a symlink loop, or the directory itself is gone
        raise file_error(shown, f"cannot be resolved ({getattr(e, 'strerror', None) or e})") from None
    if real != root and root not in real.parents:
        raise file_error(shown, f"a symlink leading outside the {what} (refused: only files inside it are read)")
    if must_exist:
        regular_file(shown, missing=f"missing from the {what}")
    return shown


def regular_file(path: Path, missing: str = "no such file") -> Path:
    """`path`, checked to be a regular file (after symlinks) without opening it: a FIFO, socket or device
    would block or never end a read."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise file_error(path, missing) from None
    except OSError as e:
        raise file_error(path, f"cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise file_error(path, f"is {kind}; hsc reads only regular files")
    return Path(path)


# C0 and C1 controls (ESC starts a terminal escape sequence), DEL, and the invisible marks that reorder or
# hide text (bidirectional overrides and isolates, zero-width characters).
_ESCAPES = {i: f"\\x{i:02x}" if i < 0x100 else f"\\u{i:04x}"
            for i in (*range(0x20), 0x7f, *range(0x80, 0xa0), *range(0x200b, 0x2010), *range(0x202a, 0x202f),
                      *range(0x2066, 0x206a), 0xfeff)}


def printable(text) -> str:
    """`text` with control characters (terminal escape sequences, newlines, C1 controls) shown as \\xNN, for
    printing strings read from files (a model name, a command line) to a terminal."""
    return str(text).translate(_ESCAPES)
