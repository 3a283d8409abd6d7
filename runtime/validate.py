"""What a field of an untrusted file may be: typed readers shared by every format hsc reads.

Each reader takes a value and the field's name, and returns the value or raises `FieldError`
(a ValueError naming the field and the problem). `Fields` wraps one JSON object of one file and
turns a `FieldError` into the one-line `HscError` "FILE: FIELD: PROBLEM". A bool is never an int,
an int-valued float is never an int, floats must be finite, strings and lists have a length bound.
`read_json` reads a JSON file with a bound on its bytes and on its nesting, so a hostile file is
refused before it can use much memory or time.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from runtime.errors import HscError, file_error

REQUIRED = object()
MAX_JSON_DEPTH = 32  # objects and lists inside each other; hsc's own files use fewer than 8
MAX_STR = 1 << 16  # characters in a string field unless the reader says otherwise
_SHA256 = re.compile(r"[0-9a-f]{64}")


class FieldError(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem

    def at(self, path, prefix: str = "") -> HscError:
        return file_error(path, f"{prefix}{self.field}: {self.problem}")


def _show(value) -> str:
    if type(value) is int and value.bit_length() > 96:  # repr of a huge int is slow, or refused
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _kind(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _typed(value, field: str, types: tuple, wanted: str):
    """`value` if its exact type is one of `types` (so a bool is never an int)."""
    if type(value) not in types:
        raise FieldError(field, f"must be {wanted}, got {_kind(value)} {_show(value)}")
    return value


def int_in(value, field: str, lo: int, hi: int) -> int:
    """An int (never a bool, never a float) in [lo, hi]."""
    _typed(value, field, (int,), "an integer")
    if not lo <= value <= hi:
        raise FieldError(field, f"{_show(value)} is outside {lo}..{hi}")
    return value


def number_in(value, field: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """A finite int or float in [lo, hi] ((lo, hi] with lo_open), returned as a float."""
    _typed(value, field, (int, float), "a number")
    try:
        x = float(value)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        raise FieldError(field, f"must be a finite number, got {_show(value)}")
    if not (lo < x if lo_open else lo <= x) or x > hi:
        raise FieldError(field, f"{x:g} is outside {'(' if lo_open else '['}{lo:g}, {hi:g}]")
    return x


def str_of(value, field: str, max_len: int = MAX_STR, choices=None) -> str:
    if len(_typed(value, field, (str,), "a string")) > max_len:
        raise FieldError(field, f"a string of {len(value)} characters (at most {max_len})")
    if choices is not None and value not in choices:
        raise FieldError(field, f"{_show(value)} is not one of {', '.join(map(str, choices))}")
    return value


def sha256_of_field(value, field: str) -> str:
    if not _SHA256.fullmatch(str_of(value, field, 64)):
        raise FieldError(field, f"{_show(value)} is not a sha256 (64 lowercase hex digits)")
    return value


def bool_of(value, field: str) -> bool:
    return _typed(value, field, (bool,), "true or false")


def list_of(value, field: str, max_len: int, length: int | None = None) -> list:
    _typed(value, field, (list,), "a list")
    if length is not None and len(value) != length:
        raise FieldError(field, f"has {len(value)} entries, expected {length}")
    if len(value) > max_len:
        raise FieldError(field, f"has {len(value)} entries (at most {max_len})")
    return value


def object_of(value, field: str) -> dict:
    return _typed(value, field, (dict,), "an object")


def optional(value, field: str, reader, *args):
    """reader(value, field, *args) unless the value is None."""
    return None if value is None else reader(value, field, *args)


def entries(value, field: str, max_len: int, reader, *args) -> list:
    """A list of at most `max_len` entries, each passing reader(entry, "field[i]", *args)."""
    return [reader(v, f"{field}[{i}]", *args) for i, v in enumerate(list_of(value, field, max_len))]


class Fields:
    """The fields of one JSON object of `path`; `prefix` names where the object sits ("model.").
    Each method reads one key (dotted keys reach into nested objects); a key that is absent reads as
    `default`, and is an error when there is none."""

    def __init__(self, raw, path, prefix: str = ""):
        self.path, self.prefix = path, prefix
        try:
            self.raw = object_of(raw, prefix.rstrip(".") or "top level")
        except FieldError as e:
            raise e.at(path) from None

    def get(self, key: str, default=REQUIRED):
        if key in self.raw:  # a key that holds dots itself ("layers.0.attention.wq")
            return self.raw[key]
        value = self.raw
        for part in key.split("."):
            if type(value) is dict and part in value:
                value = value[part]
            elif type(value) is list and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            elif default is REQUIRED:
                raise file_error(self.path, f"{self.prefix}{key}: missing")
            else:
                return default
        return value

    def read(self, reader, key: str, *args, default=REQUIRED, nullable: bool = False, **kwargs):
        value = self.get(key, default)
        if (value is default and default is not REQUIRED) or (nullable and value is None):
            return value
        try:
            return reader(value, key, *args, **kwargs)
        except FieldError as e:
            raise e.at(self.path, self.prefix) from None

    def int(self, key, lo, hi, **kw) -> int:
        return self.read(int_in, key, lo, hi, **kw)

    def number(self, key, lo, hi, **kw) -> float:
        return self.read(number_in, key, lo, hi, **kw)

    def str(self, key, max_len=MAX_STR, choices=None, **kw) -> str:
        return self.read(str_of, key, max_len, choices, **kw)

    def bool(self, key, **kw) -> bool:
        return self.read(bool_of, key, **kw)

    def list(self, key, max_len, length=None, **kw) -> list:
        return self.read(list_of, key, max_len, length, **kw)

    def sha256(self, key, **kw) -> str:
        return self.read(sha256_of_field, key, **kw)

    def obj(self, key, **kw) -> "Fields | None":
        raw = self.read(object_of, key, **kw)
        return None if raw is None else Fields(raw, self.path, f"{self.prefix}{key}.")

    def each(self, key: str, max_len: int, **kw) -> list["Fields"]:
        """A list of objects, each as Fields named key[i]."""
        items = self.list(key, max_len, **kw) or []
        return [Fields(v, self.path, f"{self.prefix}{key}[{i}].") for i, v in enumerate(items)]

    def fail(self, key: str, problem: str) -> HscError:
        return file_error(self.path, f"{self.prefix}{key}: {problem}")


def read_bounded(path: Path, max_bytes: int, what: str) -> bytes:
    """The file's bytes, refused before reading when it is larger than `max_bytes`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise file_error(path, "missing") from None
    except IsADirectoryError:
        raise file_error(path, f"is a directory, not {what}") from None
    except OSError as e:
        raise file_error(path, f"cannot be read ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise file_error(path, f"larger than {max_bytes:,} bytes: too large for {what}")
    return data


def parse_json(text: str | bytes, path, max_depth: int = MAX_JSON_DEPTH):
    """json.loads, with every way it can fail as one line naming the file; nesting deeper than
    `max_depth` and numbers json would read as inf are refused."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise file_error(path, f"not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from None
    try:
        raw = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise file_error(path, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise file_error(path, f"not valid JSON (nested more than {max_depth} deep)") from None
    except ValueError as e:  # an integer of more than 4,300 digits, NaN/Infinity
        raise file_error(path, f"not valid JSON ({str(e).splitlines()[0]})") from None
    if _depth(raw) > max_depth:
        raise file_error(path, f"not valid JSON (nested more than {max_depth} deep)")
    return raw


def read_json(path: Path, max_bytes: int, what: str, max_depth: int = MAX_JSON_DEPTH):
    return parse_json(read_bounded(path, max_bytes, what), path, max_depth)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number hsc accepts")


def _depth(raw) -> int:
    """Nesting depth, without recursion (a hostile file must not reach Python's recursion limit)."""
    deepest, stack = 0, [(raw, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest
