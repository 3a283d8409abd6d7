"""Write tiny Hugging Face LLaMA checkpoints, for tests.

The weights are a tiny Meta checkpoint's (tests/tiny_meta.py), converted the way transformers'
convert_llama_weights_to_hf.py converts them: renamed, and q_proj/k_proj rows permuted with its
`permute`. A reader must undo that permutation to get Meta's tensors back bit for bit. Written out here
on purpose (not imported from toolchain/hf_source.py): a wrong mapping there must not be mirrored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from runtime.config import ModelArgs
from tests.tiny_meta import TOKENIZER, write_tiny_meta_checkpoint

_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}
_GLOBAL = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf.py `permute` (sliced rotary), verbatim in effect."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_config(args: ModelArgs, tied: bool, v5: bool = False) -> dict:
    """config.json as transformers writes it (v5 moved rope_theta into rope_parameters)."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
           "intermediate_size": args.ffn_dim, "num_attention_heads": args.n_heads,
           "num_key_value_heads": args.kv_heads, "num_hidden_layers": args.n_layers, "rms_norm_eps": args.norm_eps,
           "vocab_size": args.vocab_size, "tie_word_embeddings": tied, "max_position_embeddings": args.max_seq_len,
           "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
           "pad_token_id": None, "initializer_range": 0.02, "use_cache": True, "pretraining_tp": 1,
           "torch_dtype": "float16", "transformers_version": "4.40.0"}
    if v5:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": args.rope_theta}
        cfg["head_dim"] = args.head_dim
    else:
        cfg["rope_theta"] = args.rope_theta
        cfg["rope_scaling"] = None
    return cfg


def write_tiny_hf_checkpoint(dirpath, args: ModelArgs, seed: int, *, fmt: str = "safetensors", n_files: int = 1,
                             dtype=torch.float32, tied: bool = False, v5: bool = False,
                             add_bos: bool | None = True) -> dict[str, torch.Tensor]:
    """Write config.json, the weights (fmt "safetensors" or "bin"; n_files > 1: shards + index),
    tokenizer.model and tokenizer_config.json into `dirpath`. Returns the ground truth under Meta's
    names and in Meta's layout (with tied: the LM head is the embedding)."""
    dirpath = Path(dirpath)
    meta_dir = dirpath.parent / f".{dirpath.name}-meta"
    truth = write_tiny_meta_checkpoint(meta_dir, args, 1, seed, dtype=dtype, with_checklist=False)
    shutil.rmtree(meta_dir)
    if tied:
        truth["output.weight"] = truth["tok_embeddings.weight"].clone()
    full = ModelArgs(**{**args.params_json(), "vocab_size": truth["tok_embeddings.weight"].shape[0]})

    hf: dict[str, torch.Tensor] = {}
    for name, t in truth.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if rest == "attention.wq.weight":
                t = hf_permute(t, full.n_heads)
            elif rest == "attention.wk.weight":
                t = hf_permute(t, full.kv_heads)
            hf[f"model.layers.{i}.{_LAYER[rest]}"] = t.contiguous()
        elif not (tied and name == "output.weight"):
            hf[_GLOBAL[name]] = t.contiguous()

    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "config.json").write_text(json.dumps(hf_config(full, tied, v5), indent=2))
    write_weights(dirpath, hf, fmt, n_files)
    shutil.copyfile(TOKENIZER, dirpath / "tokenizer.model")
    tc = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"}
    if add_bos is not None:
        tc["add_bos_token"] = add_bos
    (dirpath / "tokenizer_config.json").write_text(json.dumps(tc))
    return truth


def write_weights(dirpath: Path, hf: dict[str, torch.Tensor], fmt: str, n_files: int) -> None:
    """The tensors in n_files files, in order, as transformers' save_pretrained shards them."""
    names = list(hf)
    ext, stem = {"safetensors": ("safetensors", "model"), "bin": ("bin", "pytorch_model")}[fmt]
    chunks = [names[k * len(names) // n_files:(k + 1) * len(names) // n_files] for k in range(n_files)]
    files = [f"{stem}.{ext}"] if n_files == 1 else [f"{stem}-{k + 1:05d}-of-{n_files:05d}.{ext}" for k in range(n_files)]
    for file, chunk in zip(files, chunks):
        part = {n: hf[n] for n in chunk}
        if fmt == "safetensors":
            save_file(part, dirpath / file, metadata={"format": "pt"})
        else:
            torch.save(part, dirpath / file)
    if n_files > 1:
        weight_map = {n: file for file, chunk in zip(files, chunks) for n in chunk}
        total = sum(t.numel() * t.element_size() for t in hf.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dirpath / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
