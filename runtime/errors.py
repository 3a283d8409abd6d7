"""The one user-facing error type.

Every problem a user can cause (a bad file, an impossible plan, a tampered shard) is raised as
`HscError` with a single line that names the file and the problem; the CLI prints it and exits 1
without a traceback.
"""


MAX_MESSAGE = 1000  # characters: a hostile value quoted in a message must not flood the terminal


class HscError(Exception):
    """A user-facing failure: `str(err)` is one line naming the file and the problem."""

    exit_code = 1

    def __init__(self, message: str):
        line = " ".join(str(message).split())  # always one line
        if len(line) > MAX_MESSAGE:
            line = line[: MAX_MESSAGE - 200] + " [...] " + line[-193:]
        super().__init__(line)


class Interrupted(HscError):
    """Ctrl-C (SIGINT) stopped a run cleanly: the CLI prints the line and exits 130 (128 + SIGINT)."""

    exit_code = 130


def file_error(path, problem: str) -> HscError:
    return HscError(f"{path}: {problem}")


def warn(message: str) -> None:
    """A user-facing warning: one `hsc: warning: ...` line on stderr; the command goes on."""
    import sys

    from runtime.paths import printable  # a warning may quote a manifest: its escapes are shown, not acted on

    print(f"hsc: warning: {printable(' '.join(str(message).split()))}", file=sys.stderr, flush=True)
