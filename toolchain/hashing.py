"""Streaming file hashes (sha256 for artifacts and provenance, md5 for Meta's checklist.chk)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 16 << 20


def file_digests(path: Path, algorithms: tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """Hash one file in a single pass with each named algorithm."""
    hashers = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}


def sha256_file(path: Path) -> str:
    return file_digests(path)["sha256"]


def combined_sha256(named_digests: dict[str, str]) -> str:
    """One hash for a set of files: sha256 over 'name digest' lines in name order."""
    lines = "".join(f"{name} {named_digests[name]}\n" for name in sorted(named_digests))
    return hashlib.sha256(lines.encode()).hexdigest()
