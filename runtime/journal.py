"""The run's journal: every scored batch's results, appended as they come, so an interrupted run
(Ctrl-C, preemption, a crash, kill -9) loses at most the batch in flight.

One file per data-parallel replica, `journal/replica<R>-of-<N>.jsonl` in the output directory, written
by the replica's tensor-parallel rank 0: a header line with the run's key, then one line per batch
(`{"batch": b, "requests": [...], "loglik": [...], "greedy": [...]}`), each flushed and fsync'd before the next batch's
results arrive. A replica's batches are a fixed function of the data, the tokenizer, BOS, the engine
settings and the replica's place (the packing is deterministic), so `hsc run --resume` packs again,
skips the batches its journal holds and scores the rest: every batch is computed exactly once, with the
same shapes, and the per-item results equal an uninterrupted run's. The key holds everything that
decides a batch's contents or numbers, including a fingerprint of the packing itself; a journal with
another key is refused with one line, never mixed in. A torn last line (a kill during a write) is
dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import file_error

JOURNAL_DIR = "journal"
FORMAT = 1


def journal_path(out: Path, dp_rank: int, dp: int) -> Path:
    return Path(out) / JOURNAL_DIR / f"replica{dp_rank}-of-{dp}.jsonl"


@dataclass
class Journal:
    path: Path
    key: dict
    # batch -> (requests, logliks, greedy: whether each request's tokens are all the most likely ones)
    done: dict[int, tuple[list[int], list[float], list | None]] = field(default_factory=dict)
    _file: object = None

    def record(self, batch: int, requests: list[int], logliks: list[float], greedy: list | None) -> None:
        """Append one batch's results and make them durable before returning."""
        self.done[batch] = (requests, logliks, greedy)
        if self._file is None:
            return
        try:
            _append(self._file, {"batch": batch, "requests": requests, "loglik": logliks, "greedy": greedy})
        except OSError as e:  # a full disk mid-run: what was journalled before stays usable
            raise file_error(self.path, f"cannot write the journal ({e.strerror or e}); the batches journalled "
                                        "before are kept: rerun with --resume once that is fixed") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _append(f, doc: dict) -> None:
    f.write((json.dumps(doc) + "\n").encode())
    f.flush()
    os.fsync(f.fileno())


def _differences(got: dict, want: dict) -> str:
    names = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    return ", ".join(f"{k} {got.get(k)!r} != {want.get(k)!r}" if k != "packing" else "packing" for k in names[:3])


def _read(path: Path, key: dict) -> tuple[dict, int]:
    """The batches a journal holds and the byte length of its whole lines (a torn last line is cut)."""
    done, good = {}, 0
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    for n, line in enumerate(lines[:-1]):  # the part after the last newline is torn (or empty)
        try:
            doc = json.loads(line)
        except ValueError:
            raise file_error(path, f"line {n + 1} is not JSON: not a journal hsc wrote") from None
        if n == 0:
            if not isinstance(doc, dict) or doc.get("journal") != FORMAT:
                raise file_error(path, "not an hsc journal (no header line)")
            if doc.get("key") != key:
                raise file_error(path, f"a journal of a run with other settings ({_differences(doc.get('key') or {}, key)}); "
                                       "pass --overwrite to start again, or another --output")
        else:
            done[int(doc["batch"])] = ([int(r) for r in doc["requests"]], [float(x) for x in doc["loglik"]],
                                       doc.get("greedy"))
        good += len(line) + 1
    return done, good


def open_journal(path: Path, key: dict, resume: bool, write: bool) -> Journal:
    """resume: read what `path` holds (after checking its key) and append after it; else start it
    anew. write: this process appends (a replica's tensor-parallel rank 0); others only read."""
    done, good = {}, 0
    if resume and path.exists():
        done, good = _read(path, key)
    journal = Journal(path, key, done)
    if not write:
        return journal
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        journal._file = open(path, "r+b" if good else "wb")
        journal._file.truncate(good)  # drops a torn last line
        journal._file.seek(good)
        if not good:
            _append(journal._file, {"journal": FORMAT, "key": key})
    except OSError as e:
        raise file_error(path, f"cannot write the journal ({e.strerror or e})") from None
    return journal
