"""HellaSwag validation items, from whichever source the user has.

Sources, all yielding the same preprocessed items (lm-evaluation-harness's `hellaswag` task):
- the official jsonl (`hellaswag_val.jsonl`: activity_label, ctx_a, ctx_b, endings, label),
- a jsonl already in lm-eval's processed form (query, choices, gold),
- `datasets` (Rowan/hellaswag, validation split; needs a local cache, there is no hub here),
- the 6-line text format (optionally .bz2): query, gold label, 4 endings, already preprocessed.
The validation split has 10,042 items with 4 endings each. `hsc run` scores validation items; the
compiler may calibrate on the train split (load_split says which split items come from).
"""

from __future__ import annotations

import bz2
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import HscError, file_error
from runtime.validate import Fields, parse_json

VALIDATION_SIZE = 10_042
# The most bytes (UTF-8) a context or an ending may have (the validation set's longest context has 498,
# its longest ending 410): one oversized field is refused before it is tokenized, so it cannot make the
# packed engine's trees, and memory, grow without bound. Bytes, not characters: a byte-fallback tokenizer
# makes at most about one token of a byte, so this bounds tokens too (docs/durability.md).
MAX_FIELD_BYTES = 4096
SHARED_FILE = Path("shared/data/hellaswag_val_full.txt.bz2")


@dataclass(frozen=True)
class Item:
    index: int  # position in the source, 0-based
    query: str  # "activity_label: ctx", the context the endings continue
    endings: tuple[str, str, str, str]  # without the leading space
    label: int


def preprocess(text: str) -> str:
    """lm-eval's hellaswag preprocessing (WikiHow markup removal)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


# What a HellaSwag source may hold (docs/input-limits.md): the three splits hold 60,000 items together;
# a field is read with MAX_FIELD_BYTES as its bound in characters (a character is at least a byte), then
# measured in bytes.
MAX_LINE_BYTES = 1 << 20  # one jsonl line (one item)
MAX_ITEMS = 200_000


def from_official(doc: dict, where: str = "item") -> tuple[str, list[str], int]:
    f = Fields(doc, where)
    ctx = f.str("ctx_a", MAX_FIELD_BYTES) + " " + f.str("ctx_b", MAX_FIELD_BYTES).capitalize()
    endings = [preprocess(e) for e in _endings(f, "endings")]
    return preprocess(f.str("activity_label", MAX_FIELD_BYTES) + ": " + ctx), endings, f.get("label")


def _endings(f: Fields, key: str) -> list[str]:
    endings = f.list(key, 4)
    if len(endings) != 4:
        raise HscError(f"{f.path}: expected 4 endings, found {len(endings)}")
    return [f.str(f"{key}.{j}", MAX_FIELD_BYTES) for j in range(4)]


def _make_item(index: int, query, endings, label, where: str) -> Item:
    """An item from already-typed fields; `label` an int or the text of one, strictly 0-3."""
    if not isinstance(endings, (list, tuple)) or len(endings) != 4:
        n = len(endings) if isinstance(endings, (list, tuple)) else "no"
        raise HscError(f"{where}: expected 4 endings, found {n}")
    if isinstance(label, str) and re.fullmatch(r"-?\d{1,3}", label.strip()):
        label = int(label)
    if type(label) is int and not 0 <= label <= 3:
        raise HscError(f"{where}: label {label} is not in 0-3")
    if type(label) is not int:
        shown = repr(label) if len(repr(label)) < 40 else repr(label)[:37] + "..."
        raise HscError(f"{where}: label {shown} is not an integer 0-3")
    for text in (query, *endings):
        if not isinstance(text, str) or len(text) > MAX_FIELD_BYTES:
            raise HscError(f"{where}: a context or ending that is not text of at most {MAX_FIELD_BYTES:,} bytes")
    if not query.strip() or not all(endings):
        raise HscError(f"{where}: empty context or ending")
    longest = max(len(field.encode("utf-8", "surrogatepass")) for field in (query, *endings))
    if longest > MAX_FIELD_BYTES:
        raise HscError(f"{where}: a context or ending of {longest:,} bytes, more than the "
                       f"{MAX_FIELD_BYTES:,} hsc accepts")
    return Item(index, query, tuple(endings), label)


def _open_text(path: Path):
    return bz2.open(path, "rt", encoding="utf-8") if path.suffix == ".bz2" else open(path, encoding="utf-8")


def _lines(path: Path):
    """(line number, line) with a bound on each line's length and on the number of lines, so neither a
    huge line nor a decompression bomb is read whole."""
    with _open_text(path) as f:
        for lineno in range(1, 6 * MAX_ITEMS + 2):
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            if len(line) > MAX_LINE_BYTES:
                raise file_error(f"{path}:{lineno}", f"a line longer than {MAX_LINE_BYTES:,} characters")
            yield lineno, line
    raise file_error(path, f"more than {MAX_ITEMS:,} items")


def load_six_line(path: Path) -> list[Item]:
    lines = [line.removesuffix("\n") for _, line in _lines(path)]
    if len(lines) % 6:
        raise file_error(path, f"{len(lines)} lines is not a multiple of 6 (context, label, 4 endings per item)")
    items = []
    for k in range(0, len(lines), 6):
        query, label, *endings = lines[k:k + 6]
        items.append(_make_item(k // 6, query, endings, label, f"{path}:{k + 2}"))
    return items


def load_jsonl(path: Path) -> tuple[list[Item], set[str]]:
    """The items, and the values of the official format's `split` field ("train", "val", "test")."""
    items, splits = [], set()
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if len(items) >= MAX_ITEMS:
            raise file_error(path, f"more than {MAX_ITEMS:,} items")
        doc = Fields(parse_json(line, where), where)
        if "query" in doc.raw:
            query, endings, label = doc.str("query", MAX_FIELD_BYTES), _endings(doc, "choices"), doc.get("gold")
        else:
            query, endings, label = from_official(doc.raw, where)
            splits.add(doc.str("split", 64, default=""))
        items.append(_make_item(len(items), query, endings, label, where))
    return items, splits


def load_datasets(split: str = "validation") -> list[Item]:
    print(f"hsc: loading Rowan/hellaswag ({split} split) through `datasets` (from its cache, else the network; "
          "HF_HUB_OFFLINE=1: the cache only)", file=sys.stderr, flush=True)
    try:
        import datasets

        ds = datasets.load_dataset("Rowan/hellaswag", split=split)
    except Exception as e:  # offline, no cache, or datasets missing: all mean "not available here"
        raise HscError(f"datasets: Rowan/hellaswag ({split} split) is not available ({type(e).__name__}); "
                       "pass --data FILE (official jsonl or the 6-line .txt.bz2)") from None
    return [_make_item(i, *from_official(doc, f"Rowan/hellaswag/{split}[{i}]"), f"Rowan/hellaswag/{split}[{i}]")
            for i, doc in enumerate(ds)]


def find_shared_file(start: Path | None = None) -> Path | None:
    """The 6-line validation file under a `shared/data` folder beside or above `start` (the cwd)."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        for candidate in (folder / SHARED_FILE, folder.parent / SHARED_FILE):
            if candidate.is_file():
                return candidate
    return None


def no_data_error(flag: str = "--data", start: Path | None = None) -> HscError:
    """No `flag` and no shared file: say where hsc looked and what to pass (the `datasets` route may
    spend half a minute retrying the network, so it is never taken without being asked for)."""
    start = (start or Path.cwd()).resolve()
    return HscError(f"no {flag} given and no {SHARED_FILE} found in or beside {start} or any folder above "
                    f"it; pass {flag} FILE (the official hellaswag_val.jsonl, or hellaswag_val_full.txt.bz2) "
                    f"or {flag} datasets (Rowan/hellaswag through the `datasets` cache or network)")


def load_items(data: str | None) -> tuple[list[Item], str]:
    """Items and a description of where they came from. `data`: a file, "datasets", or None
    (the shared validation file if one is found, else no_data_error)."""
    items, source, _ = load_split(data)
    return items, source


# The official jsonl's `split` values, by the names datasets and the manifests use.
_OFFICIAL_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def load_split(data: str | None, datasets_split: str = "validation", flag: str = "--data"
               ) -> tuple[list[Item], str, str]:
    """load_items, and the split the items come from: "train", "validation", "test" or "unknown".
    With `datasets`: `datasets_split`. A file: the official jsonl's `split` field where every item has
    one and they agree; else a word of its name (train; val, validation or dev; test); else
    "validation" for a file of exactly the validation set's 10,042 items; else "unknown". flag: the option
    that gave `data`, for the error when it was left out and no shared file is found."""
    if data == "datasets":
        path = None
    elif data is None:
        path = find_shared_file()
        if path is None:
            raise no_data_error(flag)
    else:
        path = Path(data)
    if path is None:
        return load_datasets(datasets_split), f"datasets:Rowan/hellaswag/{datasets_split}", datasets_split
    if not path.is_file():
        raise file_error(path, "no such HellaSwag file")
    name = path.name.removesuffix(".bz2")
    splits: set[str] = set()
    try:
        if name.endswith((".jsonl", ".json")):
            items, splits = load_jsonl(path)
        else:
            items = load_six_line(path)
    except (UnicodeDecodeError, OSError, EOFError) as e:  # not UTF-8 text, or a damaged .bz2
        kind = "bz2-compressed UTF-8 text" if path.suffix == ".bz2" else "UTF-8 text"
        raise file_error(path, f"cannot be read as {kind} ({e})") from None
    if not items:
        raise file_error(path, "holds no items")
    return items, str(path.resolve()), _split_of(name.lower(), splits, len(items))


def _split_of(name: str, official: set[str], n_items: int) -> str:
    if len(official) == 1 and next(iter(official)) in _OFFICIAL_SPLITS:
        return _OFFICIAL_SPLITS[next(iter(official))]
    if official - {""}:  # several splits in one file, or items without the field
        return "unknown"
    words = set(re.split(r"[^a-z]+", name))  # "hellaswag_val_full.txt" -> hellaswag, val, full, txt
    named = [split for keys, split in (({"train"}, "train"), ({"val", "validation", "dev"}, "validation"),
                                       ({"test"}, "test")) if words & keys]
    if len(named) == 1:
        return named[0]
    return "validation" if n_items == VALIDATION_SIZE and not named else "unknown"
