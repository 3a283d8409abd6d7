"""Load a llama GGUF with transformers and save it as a Hugging Face checkpoint (for checking hsc's HF reader).

    python3 docs/profiling/gguf_to_hf.py MODEL.gguf OUT_DIR

transformers dequantizes the GGUF's tensors to fp32 and undoes llama.cpp's q/k row order, so OUT_DIR is
what a user who converted the model with transformers holds: config.json, model.safetensors (HF's q/k
layout, tied embeddings), tokenizer.json and tokenizer_config.json (transformers' own conversion of the
GGUF vocabulary). Needs transformers, accelerate and gguf.

A model loaded from a GGUF keeps a quantizer that refuses save_pretrained, so its fp32 state dict is
loaded into a fresh model built from the same config, which saves normally.
"""

import sys
from pathlib import Path

# This folder's kernels.py would shadow the `kernels` package transformers probes for.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402


def main(gguf: Path, out: Path) -> None:
    import importlib.util

    missing = [m for m in ("transformers", "accelerate", "gguf") if importlib.util.find_spec(m) is None]
    if missing:  # transformers asks for accelerate only once the GGUF is half loaded
        sys.exit(f"gguf_to_hf.py: needs {', '.join(missing)} (pip install, or carry the wheels)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    main(Path(sys.argv[1]), Path(sys.argv[2]))
