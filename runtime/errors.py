"""The one user-facing error type.

Every problem a user can cause (a bad file, an impossible plan, a tampered shard) is raised as
`HscError` with a single line that names the file and the problem; the CLI prints it and exits 1
without a traceback.
"""


class HscError(Exception):
    """A user-facing failure: `str(err)` is one line naming the file and the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


def file_error(path, problem: str) -> HscError:
    return HscError(f"{path}: {problem}")


def warn(message: str) -> None:
    """A user-facing warning: one `hsc: warning: ...` line on stderr; the command goes on."""
    import sys

    print(f"hsc: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
