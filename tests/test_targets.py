"""The planner: precision per target, tensor-parallel degree from memory, refusals."""

import pytest

from runtime.config import ModelArgs
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
        get_target("v100x3")
    with pytest.raises(HscError, match="compute capability 7.0.*fp16"):
        make_plan(LLAMA_30B, get_target("v100x4"), "bf16")
    with pytest.raises(HscError, match="does not fit"):
        make_plan(ModelArgs(dim=8192, n_layers=200, n_heads=64, vocab_size=32000), get_target("v100x4"))


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
