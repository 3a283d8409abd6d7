"""The one user-facing error type.

Every problem a user can cause (a bad file, an impossible plan, a tampered shard) is raised as
`HscError` with a single line that names the file and the problem; the CLI prints it and exits 1
without a traceback.
"""


MAX_MESSAGE = 1000  # characters: a hostile value quoted in a message must not flood the terminal


class HscError(Exception):
    """A user-facing failure: `str(err)` is one line naming the file and the problem."""

    def __init__(self, message: str):
        line = " ".join(str(message).split())  # always one line
        if len(line) > MAX_MESSAGE:
            line = line[: MAX_MESSAGE - 200] + " [...] " + line[-193:]
        super().__init__(line)


def file_error(path, problem: str) -> HscError:
    return HscError(f"{path}: {problem}")
