"""Safetensors dtype names, their sizes, and their torch equivalents.

The byte size decides every offset the tool computes, so it is kept here as plain data; torch is only
needed when values must be converted (PRE stored in another dtype than POST) or computed (QK-Pro),
and is imported only then: a plain merge never pays torch's second of start-up and 200 MB.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Bits per element of every dtype safetensors knows: the Rust crate's ``Dtype`` enum and its
# ``bitsize()`` (huggingface/safetensors, safetensors/src/tensor.rs, 0.8). F4 and the two F6 types
# are packed without padding: a tensor's size is ``elements * bits / 8`` and must be whole bytes.
BITSIZE: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

# Byte size of one element, for the dtypes whose elements are whole bytes. Sub-byte types (F4, F6)
# have no entry: their tensors are copied as bytes, and their rows only where a row fills whole bytes.
ITEMSIZE: dict[str, int] = {k: v // 8 for k, v in BITSIZE.items() if v % 8 == 0}

# torch's name for each dtype it can compute with; the others can be copied but not converted.
TORCH_DTYPE_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
}


def cast_chunk(chunk: int, src: str, dst: str) -> int:
    """The largest size up to ``chunk`` that holds whole elements of both dtypes of a cast."""
    return chunk - chunk % (ITEMSIZE[src] * ITEMSIZE[dst])


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    import torch

    return getattr(torch, TORCH_DTYPE_NAMES[name])


FLOAT_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})
INTEGER_DTYPES = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"})


def convert(data: bytes | bytearray | memoryview, src: str, dst: str) -> bytes:
    """Convert little-endian elements of dtype ``src`` to ``dst`` with torch's rounding.

    Used only where PRE and POST store a tensor in different dtypes; equal dtypes are copied as bytes.
    """
    import torch

    if src not in TORCH_DTYPE_NAMES or dst not in TORCH_DTYPE_NAMES:
        raise ValueError(f"cannot convert {src} to {dst}")
    if len(data) == 0:
        return b""
    values = torch.frombuffer(bytearray(data), dtype=torch_dtype(src))
    return values.to(torch_dtype(dst)).view(torch.uint8).numpy().tobytes()


def to_tensor(data: bytes | bytearray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """View raw little-endian bytes as a torch tensor (copying once so the tensor owns its memory)."""
    import torch

    if len(data) == 0:
        return torch.empty(shape, dtype=torch_dtype(dtype))
    return torch.frombuffer(bytearray(data), dtype=torch_dtype(dtype)).reshape(shape)


def to_bytes(tensor: torch.Tensor, dtype: str) -> bytes:
    """Cast ``tensor`` to ``dtype`` and return its little-endian bytes."""
    import torch

    out = tensor.detach().to("cpu").to(torch_dtype(dtype)).contiguous()
    return out.view(torch.uint8).numpy().tobytes()


# Exponent masks of the IEEE-like float dtypes: a value is NaN or Inf exactly when every exponent
# bit is set. (FP8/FP6/FP4 formats have no Inf and mostly no NaN encoding: not listed.)
_EXPONENT_MASKS: dict[str, tuple[str, int]] = {
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F32": ("<u4", 0x7F800000),
    "F64": ("<u8", 0x7FF0000000000000),
}


def has_nonfinite(data: bytes, dtype: str) -> bool:
    """Whether little-endian ``data`` of ``dtype`` holds a NaN or an Inf, read from the bits
    (numpy, no torch: checking an adapter's factors costs a plain merge no torch start-up)."""
    spec = _EXPONENT_MASKS.get(dtype)
    if spec is None or not data:
        return False
    import numpy as np

    fmt, mask = spec
    bits = np.frombuffer(data, dtype=np.dtype(fmt))
    m = np.array(mask, dtype=bits.dtype)
    return bool(np.any((bits & m) == m))
