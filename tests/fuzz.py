"""Seeded structural mutations of hsc's input formats, and the contract every reader keeps on them.

A case is (format, seed, k): `random.Random(f"{seed}:{k}")` draws the mutation, so the label printed
with a failure reproduces it. Mutators return bytes; JSON mutators work on the parsed document
(fields deleted, retyped, huge, negative, nested) and write raw text where json.dumps cannot
(integers of thousands of digits, 1e400, NaN, deep nesting); binary mutators truncate, flip bits
and overwrite counts, lengths and offsets at the positions a format keeps them.

The contract (`expect_clean`): the call returns, or raises HscError with one line naming the file;
any other exception, more than `TIME_LIMIT_S` seconds or more than `RSS_LIMIT_BYTES` of new peak
resident memory is a failure.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import random
import signal
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import HscError
from toolchain.resources import _reset_hwm, read_status

TIME_LIMIT_S = 60.0  # per case: a hang detector, far above any honest case even on a loaded 2-core machine
RSS_LIMIT_BYTES = 768 << 20  # new peak RSS per case: a hostile size must be refused before it is allocated

# ---------------------------------------------------------------- JSON documents

_HUGE_DIGITS = "9" * 5000
# Replacement values: (description, value, or RawJson for text json.dumps would not write).


@dataclass(frozen=True)
class RawJson:
    text: str


REPLACEMENTS = [
    ("null", None), ("true", True), ("false", False), ("zero", 0), ("minus one", -1), ("negative", -4096),
    ("2**31-1", 0x7FFFFFFF), ("2**32", 1 << 32), ("2**64", 1 << 64), ("empty string", ""), ("string", "64"),
    ("float", 0.5), ("int-valued float", 64.0), ("1e30", 1e30), ("empty list", []), ("empty object", {}),
    ("list of ints", [1, 2, 3]), ("object", {"a": 1}), ("long string", "x" * 100_000),
    ("long list", [0] * 100_000), ("5000 digits", RawJson(_HUGE_DIGITS)), ("-5000 digits", RawJson("-" + _HUGE_DIGITS)),
    ("1e400", RawJson("1e400")), ("-1e400", RawJson("-1e400")), ("NaN", RawJson("NaN")), ("Infinity", RawJson("Infinity")),
    ("nested 100000", RawJson("[" * 100_000 + "]" * 100_000)), ("nested 40", RawJson("[" * 40 + "]" * 40)),
    ("string 0_1", "0_1"), ("string with newline", "a\nb"), ("control characters", "\u202e\u0000"),
]


def _paths(doc, prefix=()) -> list[tuple]:
    """Every key path in the document (dict keys and list indices), parents before children."""
    out = []
    if isinstance(doc, dict):
        items = doc.items()
    elif isinstance(doc, list):
        items = list(enumerate(doc))[:8]  # a few entries of a long list are enough
    else:
        return out
    for k, v in items:
        out.append(prefix + (k,))
        out += _paths(v, prefix + (k,))
    return out


def _set(doc, path, value):
    for k in path[:-1]:
        doc = doc[k]
    doc[path[-1]] = value


def _delete(doc, path):
    for k in path[:-1]:
        doc = doc[k]
    del doc[path[-1]]


def dumps(doc) -> str:
    """json.dumps, with RawJson values written as their text."""
    raws: dict[str, str] = {}

    def swap(v):
        if isinstance(v, RawJson):
            key = f"@@raw{len(raws)}@@"
            raws[key] = v.text
            return key
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(doc))
    for key, raw in raws.items():
        text = text.replace(json.dumps(key), raw)
    return text


def mutate_json(doc, rng: random.Random, focus=None) -> tuple[str, str]:
    """(description, text) of one structural mutation of `doc` (not modified). `focus`: only paths
    for which focus(path) is true."""
    doc = json.loads(json.dumps(doc))
    paths = [p for p in _paths(doc) if focus is None or focus(p)]
    op = rng.random()
    if not paths or op < 0.04:
        return "whole document replaced", dumps(rng.choice(REPLACEMENTS)[1])
    path = rng.choice(paths)
    where = ".".join(map(str, path))
    if op < 0.2:
        _delete(doc, path)
        return f"{where} deleted", dumps(doc)
    if op < 0.3:  # the field's value wrapped or nested
        value = _get(doc, path)
        _set(doc, path, rng.choice([[value], {"value": value}, [[[[value]]]], str(value)]))
        return f"{where} wrapped", dumps(doc)
    if op < 0.38 and isinstance(_get(doc, path), (int, float)) and not isinstance(_get(doc, path), bool):
        value = _get(doc, path)
        new = rng.choice([-value, value * 1000, value + 1, value - 1, value * 2**40, value / 3])
        _set(doc, path, new)
        return f"{where} {value!r} -> {new!r}", dumps(doc)
    name, value = rng.choice(REPLACEMENTS)
    _set(doc, path, value)
    return f"{where} = {name}", dumps(doc)


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


# ---------------------------------------------------------------- bytes


def mutate_bytes(data: bytes, rng: random.Random, hot: list[tuple[int, int]] | None = None) -> tuple[str, bytes]:
    """(description, bytes): truncated, bit-flipped, or a field overwritten with an absurd value.
    `hot`: (offset, width) of the fields a format keeps counts, lengths and offsets in; most
    overwrites land there."""
    b = bytearray(data)
    op = rng.random()
    if op < 0.2 or not b:
        n = rng.choice([0, 1, 4, 8, 16, rng.randrange(len(b) + 1)]) if b else 0
        return f"truncated to {n} bytes", bytes(b[:n])
    if op < 0.45:
        flips = [rng.randrange(len(b) * 8) for _ in range(rng.choice([1, 1, 2, 8]))]
        for bit in flips:
            b[bit // 8] ^= 1 << (bit % 8)
        return f"bits {flips[:4]} flipped", bytes(b)
    if op < 0.55:
        at, n = rng.randrange(len(b)), rng.choice([1, 7, 64, 4096])
        b[at:at + n] = bytes(rng.randrange(256) for _ in range(min(n, len(b) - at)))
        return f"{n} random bytes at {at}", bytes(b)
    if hot:
        at, width = rng.choice(hot)
    else:
        width = rng.choice([4, 8])
        at = rng.randrange(max(1, len(b) - width))
    value = rng.choice([0, 1, 2, 3, 0x7F, 0xFF, 0x7FFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 40, (1 << 63) - 1, (1 << 64) - 1,
                        rng.randrange(1 << 16)])
    value &= (1 << (8 * width)) - 1
    b[at:at + width] = value.to_bytes(width, "little")
    return f"{width}-byte field at {at} = {value:#x}", bytes(b)


def safetensors_header(data: bytes) -> tuple[dict, int]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), 8 + n


def with_safetensors_header(data: bytes, header_text: str, end: int) -> bytes:
    raw = header_text.encode()
    return struct.pack("<Q", len(raw)) + raw + data[end:]


def gguf_hot_fields(path: Path) -> list[tuple[int, int]]:
    """(offset, width) of every count, length, type, dimension and offset field of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r")
    hot = []
    fields = list(reader.fields.values()) + [t.field for t in reader.tensors]
    for f in fields:
        offset = f.offset
        for part in f.parts:
            step = part.dtype.itemsize
            if part.dtype.kind in "iu" and step >= 4:
                hot += [(offset + k * step, step) for k in range(min(part.size, 4))]
            offset += int(part.nbytes)
    del reader
    return hot


def gguf_part_offset(path: Path, name: str, part: int | None = None) -> tuple[int, int]:
    """(offset, width) in the file of a metadata key's value (part None) or of part `part` of a
    tensor's info (2 n_dims, 3 dims, 4 type, 5 data offset)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r")
    if part is None:
        f = reader.fields[name]
        part = f.data[0]
    else:
        f = next(t.field for t in reader.tensors if t.name == name)
    offset = f.offset + sum(int(p.nbytes) for p in f.parts[:part])
    width = int(f.parts[part].dtype.itemsize)
    del reader
    return offset, width


def patch(path: Path, offset: int, value: int, width: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value.to_bytes(width, "little"))


# ---------------------------------------------------------------- the contract


@dataclass
class Tally:
    """Outcomes per format, for the slow run's figures."""

    counts: dict = field(default_factory=dict)

    def add(self, fmt: str, outcome: str) -> None:
        self.counts.setdefault(fmt, {}).setdefault(outcome, 0)
        self.counts[fmt][outcome] += 1


# Where a hung case's stacks go: a copy of the original stderr, since fd 2 is redirected during a case.
_STACKS = os.fdopen(os.dup(2), "w")


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _native_stderr(sink: list):
    """What native code (a Rust panic message, a C++ library's log) writes to file descriptor 2 meanwhile:
    the CLI's stderr must hold the one error line and nothing else."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode(errors="replace"))


@contextlib.contextmanager
def _time_limit(seconds: float):
    def alarm(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    # A hang inside C code never returns to Python for the alarm: dump every stack and exit instead.
    faulthandler.dump_traceback_later(seconds * 3, exit=True, file=_STACKS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        faulthandler.cancel_dump_traceback_later()


def expect_clean(call, label: str, names: tuple[str, ...] = (), time_limit: float = TIME_LIMIT_S,
                 rss_limit: int = RSS_LIMIT_BYTES) -> str:
    """Run `call()`; 'accepted' if it returns, 'refused' if it raises a one-line HscError that names
    one of `names` (file names); anything else fails with `label` (which reproduces the case). The
    memory bound needs a kernel that lets the peak be reset (Linux /proc/self/clear_refs); elsewhere
    only the RLIMIT_AS run (tests/test_fuzz.py) bounds memory."""
    hwm_reset = _reset_hwm()
    rss0 = read_status().get("VmRSS", 0)
    t0 = time.perf_counter()
    native: list[str] = []
    try:
        with _time_limit(time_limit), _native_stderr(native):
            call()
        outcome = "accepted"
    except HscError as e:
        message = str(e)
        assert "\n" not in message, f"{label}: HscError of several lines: {message!r}"
        assert not names or any(n in message for n in names), f"{label}: the error names no file of {names}: {message}"
        assert len(message) < 2000, f"{label}: an error line of {len(message)} characters"
        outcome = "refused"
    except _Timeout:
        raise AssertionError(f"{label}: still running after {time_limit} s") from None
    except (Exception, BaseException) as e:  # BaseException: a Rust panic from a library (pyo3) too
        if isinstance(e, KeyboardInterrupt):
            raise
        tb = "".join(traceback.format_exception(e)[-6:])
        raise AssertionError(f"{label}: {type(e).__name__} instead of HscError: {e}\n{tb}") from None
    assert not native[0].strip(), f"{label}: native code wrote to stderr: {native[0][:500]!r}"
    elapsed = time.perf_counter() - t0
    assert elapsed < time_limit, f"{label}: took {elapsed:.1f} s"
    if hwm_reset:
        grown = read_status().get("VmHWM", 0) - rss0
        assert grown < rss_limit, f"{label}: peak resident memory grew by {grown / 2**20:.0f} MiB"
    return outcome
