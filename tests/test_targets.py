"""The planner: precision per target, tensor-parallel degree from memory, refusals."""

import json
from types import SimpleNamespace

import pytest
import torch

from runtime.config import Mapping, ModelArgs
from runtime.errors import HscError
from toolchain.targets import activation_bytes, get_target, make_plan

LLAMA_30B = ModelArgs(dim=6656, n_layers=60, n_heads=52, multiple_of=256, vocab_size=32000)
LLAMA_7B = ModelArgs(dim=4096, n_layers=32, n_heads=32, multiple_of=256, vocab_size=32000)


def test_llama30b_shape():
    assert LLAMA_30B.ffn_dim == 17920
    assert 32.4e9 < LLAMA_30B.n_params() < 32.6e9


def test_v100x4_needs_tp4_in_fp16():
    plan = make_plan(LLAMA_30B, get_target("v100x4"))
    assert plan.precision == "fp16" and (plan.mapping.tp, plan.mapping.dp) == (4, 1)
    assert "TP=4" in plan.explanation and "no bf16" in plan.explanation


def test_h200x4_replicates_whole_model():
    plan = make_plan(LLAMA_30B, get_target("h200x4"))
    assert plan.precision == "bf16" and (plan.mapping.tp, plan.mapping.dp) == (1, 4)


def test_7b_on_a100x4_is_data_parallel_and_cpu_is_fp32():
    assert make_plan(LLAMA_7B, get_target("a100x4")).mapping.dp == 4
    plan = make_plan(LLAMA_7B, get_target("cpu"))
    assert plan.precision == "fp32" and plan.mapping.world_size == 1


def test_52_heads_cannot_use_tp8():
    with pytest.raises(HscError, match="52 heads"):
        make_plan(LLAMA_30B, get_target("h100x8"), tp=8)
    # Unforced: 65 GB of bf16 fits one 80 GB H100, so eight replicas.
    plan = make_plan(LLAMA_30B, get_target("h100x8"))
    assert (plan.mapping.tp, plan.mapping.dp) == (1, 8)
    # In fp32 (130 GB) it needs TP=2, a degree that divides 52 heads.
    assert make_plan(LLAMA_30B, get_target("h100x8"), "fp32").mapping.tp == 2


def test_refusals():
    with pytest.raises(HscError, match="unknown target"):
        get_target("v100 x3")
    with pytest.raises(HscError, match="compute capability 7.0.*fp16"):
        make_plan(LLAMA_30B, get_target("v100x4"), "bf16")
    with pytest.raises(HscError, match="does not fit"):
        make_plan(ModelArgs(dim=8192, n_layers=200, n_heads=64, vocab_size=32000), get_target("v100x4"))


# ---- target specs and --target auto ----


@pytest.mark.parametrize("spec, gpu, cc, n, mem", [
    ("h100-80gbx2", "H100 80GB", (9, 0), 2, 80.0), ("a100-40gbx4", "A100 40GB", (8, 0), 4, 40.0),
    ("l40sx1", "L40S 48GB", (8, 9), 1, 48.0), ("rtx4090x1", "RTX 4090 24GB", (8, 9), 1, 24.0),
    ("sm86-24gbx3", "sm_86 24GB", (8, 6), 3, 24.0), ("V100-16GBx8", "V100 16GB", (7, 0), 8, 16.0)])
def test_target_specs(spec, gpu, cc, n, mem):
    t = get_target(spec)
    assert (t.name, t.gpu, t.compute_capability, t.n_gpus, t.mem_per_gpu_gib) == (spec.lower(), gpu, cc, n, mem)
    assert ("bf16" in t.tensor_core_dtypes) == (cc >= (8, 0)) and ("fp8" in t.tensor_core_dtypes) == (cc >= (8, 9))


def test_specs_of_listed_targets_are_those_targets():
    assert get_target("h200-141gbx2") is get_target("h200x2") and get_target("a100-80gbx4") is get_target("a100x4")


@pytest.mark.parametrize("spec, problem", [
    ("tpu9000", "unknown target 'tpu9000'"), ("foo-24gbx1", "unknown GPU 'foo'"),
    ("a100-48gbx1", "A100 comes with 80 or 40 GB; for another size use sm80-48gbx1"),
    ("h100x0", "0 GPUs; choose 1..64"), ("sm89x1", "needs its memory")])
def test_bad_specs(spec, problem):
    with pytest.raises(HscError) as e:
        get_target(spec)
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_plans_on_spec_targets():
    # 30B bf16 (65 GB): on 4 x A100-40GB, TP=2 (32.5 GB/GPU, under 80% of 40 GiB) x DP=2; 2 x RTX 4090 cannot
    assert make_plan(LLAMA_30B, get_target("a100-40gbx4")).mapping == Mapping(2, 2)
    with pytest.raises(HscError, match="does not fit"):
        make_plan(LLAMA_30B, get_target("rtx4090x2"))
    assert make_plan(LLAMA_7B, get_target("l40sx2"), "fp8").mapping == Mapping(1, 2)


def _fake_cuda(monkeypatch, gpus):
    """torch.cuda as seen on a machine with these (name, (major, minor), total bytes) GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(gpus))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(
        name=gpus[i][0], major=gpus[i][1][0], minor=gpus[i][1][1], total_memory=gpus[i][2]))


@pytest.mark.parametrize("gpus, want", [
    ([], ("cpu", "", None, 0)),
    ([("NVIDIA H200", (9, 0), 150_754_820_096)], ("h200x1", "H200 141GB", (9, 0), 1)),
    ([("NVIDIA H100 80GB HBM3", (9, 0), 85_045_379_072)] * 2, ("h100-80gbx2", "H100 80GB", (9, 0), 2)),
    ([("NVIDIA A100-SXM4-40GB", (8, 0), 42_505_273_344)] * 4, ("a100-40gbx4", "A100 40GB", (8, 0), 4)),
    ([("NVIDIA GeForce RTX 4090", (8, 9), 25_386_352_640)], ("rtx4090-24gbx1", "RTX 4090 24GB", (8, 9), 1)),
    ([("NVIDIA A10", (8, 6), 23_836_229_632)], ("a10-24gbx1", "A10 24GB", (8, 6), 1)),
    ([("Some Future GPU", (10, 0), 200 * 2**30)] * 8, ("sm100-200gbx8", "Some Future GPU 200GB", (10, 0), 8)),
])
def test_target_auto(monkeypatch, gpus, want):
    _fake_cuda(monkeypatch, gpus)
    t = get_target("auto")
    assert (t.name, t.gpu, t.compute_capability, t.n_gpus) == want


def test_target_auto_compile_records_the_machine(tmp_path, monkeypatch, hsc):
    """hsc compile --target auto on a (simulated) 2 x L40S box: the plan and the manifest name its target."""
    from tests.tiny_meta import write_tiny_meta_checkpoint

    _fake_cuda(monkeypatch, [("NVIDIA L40S", (8, 9), 48 * 10**9)] * 2)
    write_tiny_meta_checkpoint(tmp_path / "ck", ModelArgs(dim=64, n_layers=1, n_heads=4, multiple_of=32), 1, seed=0)
    code, out, err = hsc("compile", tmp_path / "ck", "--target", "auto", "-o", tmp_path / "art")
    assert code == 0, err
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["target"] == "l40s-48gbx2" and manifest["precision"] == "bf16"
    assert manifest["mapping"] == {"tp": 1, "dp": 2}
    assert manifest["target_info"] == {"gpu": "L40S 48GB", "compute_capability": [8, 9], "n_gpus": 2,
                                       "mem_per_gpu_gib": 48.0}
    assert "L40S 48GB x2: TP=1" in out


@pytest.mark.parametrize("target, tp", [("h200x4", 2), ("v100x4", 4), ("cpu", None)])
def test_the_plan_counts_every_byte_of_a_rank_file(tmp_path, target, tp):
    """The plan's per-rank weights are the bytes of tensors each rank file holds: its slices plus the
    replicated embeddings, LM head and norms (here 8 MB of the 32,000-token vocabulary, so a plan that
    divided the whole model by TP would be far off); the compile prints that figure."""
    from tests.tiny_meta import write_tiny_meta_checkpoint
    from toolchain.compile import compile_checkpoint

    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=-1, multiple_of=32)
    write_tiny_meta_checkpoint(tmp_path / "ckpt", args, 1, seed=0)
    printed = []
    manifest, art = compile_checkpoint(tmp_path / "ckpt", target, "auto", tmp_path / "art", "test", tp=tp,
                                       log=printed.append)
    plan = make_plan(manifest.model, get_target(target), "auto", tp=tp)
    assert len(manifest.shards) == (tp or 1)
    for shard in manifest.shards:
        raw = (art / shard.file).read_bytes()
        header = 8 + int.from_bytes(raw[:8], "little")  # safetensors: u64 header size, header, data
        assert len(raw) - header == plan.rank_bytes, shard.file
    assert plan.rank_bytes > manifest.model.n_params() * 2 / (tp or 1)
    assert plan.activation_bytes > 0
    assert any(f"{plan.rank_bytes / 1e9:.2f} GB of weights" in line and
               f"{plan.activation_bytes / 1e9:.2f} GB of activations" in line for line in printed), printed


def test_activations_grow_with_the_batch_and_shrink_with_tp():
    a1 = activation_bytes(LLAMA_30B, "bf16", 1, on_gpu=True)
    assert activation_bytes(LLAMA_30B, "bf16", 4, on_gpu=True) < a1
    assert activation_bytes(LLAMA_30B, "bf16", 1, on_gpu=True, batch_tokens=32768) > 1.9 * a1
    # 16,384 tokens of LLaMA-30B in bf16: ~3.6 GB of block activations, ~3.1 GB of fp32 logits.
    assert 6e9 < a1 < 8e9
