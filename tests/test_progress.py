"""runtime.progress: a bar on a terminal, plain lines in a log, silence for a short step."""

import io

import runtime.progress
from runtime.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_short_step_is_silent_in_a_log(capsys):
    with Progress(3, "writing", "tensors") as bar:
        for _ in range(3):
            bar.update()
    assert capsys.readouterr().err == ""


def test_a_long_step_logs_plain_lines(monkeypatch):
    monkeypatch.setattr(runtime.progress, "LOG_EVERY_S", 0.0)
    log = io.StringIO()
    with Progress(4, "scoring", "scored tok", stream=log) as bar:
        bar.update(1)
        bar.update(3)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("hsc: scoring: 1/4 scored tok (25%), ") and "s left" in lines[0]
    assert lines[-1].startswith("hsc: scoring: 4/4 scored tok (100%), ") and "left" not in lines[-1]
    assert "\r" not in log.getvalue()
    assert len(lines) == 2  # the end is not printed twice


def test_a_terminal_gets_a_bar_and_a_rank_other_than_0_nothing():
    term = Terminal()
    with Progress(4, "scoring", "scored tok", stream=term) as bar:
        bar.update(4)
    assert "\r" in term.getvalue() and "4/4" in term.getvalue()
    quiet = Terminal()
    with Progress(4, "scoring", "scored tok", enabled=False, stream=quiet) as bar:
        bar.update(4)
    assert quiet.getvalue() == ""
