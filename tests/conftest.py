import sys
from pathlib import Path

import pytest

from runtime.hellaswag import find_shared_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_hsc_cache(tmp_path_factory, monkeypatch):
    """hsc's per-user cache (verification records, compile caches) in a folder of the test session,
    never the user's own ~/.cache/hsc."""
    monkeypatch.setenv("HSC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hsc-cache"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = find_shared_file(REPO)
    if path is None:
        pytest.skip("shared/data/hellaswag_val_full.txt.bz2 not found beside the repository")
    return path


@pytest.fixture
def hsc(capsys, monkeypatch):
    """Run the real `hsc` entry point in-process: returns (exit code, stdout, stderr)."""
    from toolchain.cli import main

    def call(*args):
        monkeypatch.setattr(sys, "argv", ["hsc", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return call
