"""Write a safetensors file tensor by tensor, so a 30B model never sits in host memory whole.

`safetensors.torch.save_file` needs every tensor at once. The format is simple enough to stream:
an 8-byte little-endian header length, a JSON header with each tensor's dtype, shape and byte
range, then the raw bytes in that order. We know every shape before the first byte is written,
so the header goes first and tensors follow as the compiler produces them. The sha256 is
computed on the way, so nothing is read back.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float8_e4m3fn: "F8_E4M3",
}


class StreamingSafetensorsWriter:
    def __init__(self, path: Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        """layout: (name, shape, dtype) for every tensor, in the order they will be written."""
        header: dict = {"__metadata__": dict(metadata or {})}
        offset = 0
        for name, shape, dtype in layout:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
        self._expected = [(name, tuple(shape), dtype) for name, shape, dtype in layout]
        self._next = 0
        self._sha = hashlib.sha256()
        self.path = Path(path)
        self.bytes = 0
        self.params_by_dtype: dict[str, int] = {}
        self._f = open(self.path, "wb")
        self._write(struct.pack("<Q", len(raw)) + raw)

    def _write(self, data) -> None:
        self._f.write(data)
        self._sha.update(data)
        self.bytes += len(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, want_shape, want_dtype = self._expected[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (want_name, want_shape, want_dtype):
            raise ValueError(f"expected {want_name} {want_shape} {want_dtype}, got "
                             f"{name} {tuple(tensor.shape)} {tensor.dtype}")
        self._next += 1
        self._write(memoryview(tensor.detach().contiguous().cpu().view(torch.uint8).numpy()).cast("B"))
        key = str(tensor.dtype).removeprefix("torch.")
        self.params_by_dtype[key] = self.params_by_dtype.get(key, 0) + tensor.numel()

    def close(self) -> str:
        """Finish the file and return its sha256."""
        if self._next != len(self._expected):
            missing = self._expected[self._next][0]
            raise ValueError(f"{self.path}: closed before all tensors were written (next: {missing})")
        self._f.close()
        return self._sha.hexdigest()

    def abort(self) -> None:
        self._f.close()
