"""Progress of a step that takes more than a few seconds, on stderr: a tqdm bar on a terminal; in a
log (stderr not a terminal) plain lines, one every `every_s` seconds and, if there was one, one at the
end, so a log shows the step is alive and how long it has left without a bar's carriage returns (and
a short step stays silent)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

LOG_EVERY_S = 30.0


class Progress:
    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, every_s: float | None = None,
                 stream=None):
        self.total, self.desc, self.unit = total, desc, unit
        self.every_s = LOG_EVERY_S if every_s is None else every_s
        self.stream = stream if stream is not None else sys.stderr
        self.done, self.start = 0, time.monotonic()
        self.last, self.logged = self.start, 0  # when the last line was printed, and its count
        tty = self.stream.isatty()
        self.bar = tqdm(total=total, unit=unit, desc=desc, file=self.stream) if enabled and tty else None
        self.lines = enabled and not tty

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and time.monotonic() - self.last >= self.every_s:
            self._line()

    def _line(self) -> None:
        self.last, self.logged = time.monotonic(), self.done
        print(f"hsc: {self.line()}", file=self.stream, flush=True)

    def line(self) -> str:
        """`desc: done/total unit (pct), rate, time left`, as the log shows it."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        left = f", about {(self.total - self.done) / rate:.0f} s left" if 0 < self.done < self.total else ""
        return (f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{rate:,.1f} {self.unit}/s, {elapsed:.0f} s{left}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines and self.last > self.start and self.logged != self.done:  # a long step: its end too
            self._line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
