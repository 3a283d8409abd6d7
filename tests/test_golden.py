"""hsc against frozen files (tests/golden/, regenerated on purpose by `python3 -m tests.make_golden`):
SmolLM2's log-likelihoods on a slice of HellaSwag from the float64 reference, and the manifest of a tiny
artifact, so that a change in numbers or in the artifact format is a visible, deliberate diff."""

import json

import pytest

from runtime.artifact import sha256_of
from runtime.run import RunConfig, run
from tests.make_golden import MANIFEST_V1, N_ITEMS, SMOLLM2_SLICE, tiny_manifest
from toolchain.compile import compile_checkpoint

TOLERANCE = 1e-4  # fp32 against float64, per ending: summation order only


@pytest.fixture(scope="module")
def golden():
    return json.loads(SMOLLM2_SLICE.read_text())


@pytest.fixture(scope="module")
def smollm2_fp32(tmp_path_factory, smollm2_path, golden):
    assert sha256_of(smollm2_path) == golden["model_sha256"], \
        f"{smollm2_path} is not the model {SMOLLM2_SLICE.name} was made from; regenerate it: {golden['regenerate']}"
    art = tmp_path_factory.mktemp("golden") / "smollm2-fp32"
    compile_checkpoint(smollm2_path, "cpu", "fp32", art, "test", log=lambda *_: None)
    return art


@pytest.mark.parametrize("engine", ["packed", "reference"])
def test_smollm2_fp32_matches_the_float64_golden_slice(smollm2_fp32, shared_data, golden, tmp_path, engine):
    out = tmp_path / "res"
    results = run(RunConfig(smollm2_fp32, str(shared_data), limit=N_ITEMS, output=out, device="cpu", engine=engine),
                  "test", echo=lambda *_: None)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == golden["items"] == N_ITEMS
    for got, want in zip(samples, golden["samples"]):
        assert (got["index"], got["label"], got["cont_tokens"]) == (want["index"], want["label"], want["cont_tokens"])
        worst = max(abs(a - b) for a, b in zip(got["loglik"], want["loglik"]))
        assert worst < TOLERANCE, f"item {got['index']}: {got['loglik']} against {want['loglik']}"
        assert (got["pred"], got["pred_norm"]) == (want["pred"], want["pred_norm"])
    assert (results["acc"], results["acc_norm"]) == (golden["acc"], golden["acc_norm"])


def test_tiny_artifact_manifest_is_frozen(tmp_path):
    """A diff here is a format change: make it on purpose (format_version, the readers, the reference
    docs) and regenerate with `python3 -m tests.make_golden manifest`."""
    assert tiny_manifest(tmp_path) == json.loads(MANIFEST_V1.read_text())
