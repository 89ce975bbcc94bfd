"""Dtype names as rules files and the CLI spell them (no torch import: validation uses it)."""

from __future__ import annotations

# Short and C-style names users write, to torch's own names.
DTYPE_ALIASES = {
    "fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64",
    "half": "float16", "float": "float32", "double": "float64",
    "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2",
}  # fmt: skip

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2")
OTHER_DTYPES = ("int8", "uint8", "int16", "int32", "int64", "bool")

# Every name a rules file may give, torch's first, then the aliases.
KNOWN_NAMES = (*FLOAT_DTYPES, *DTYPE_ALIASES, *OTHER_DTYPES)


def canonical_dtype(name: str) -> str:
    """``"bf16"``/``"BFloat16"``/``"torch.bfloat16"`` -> ``"bfloat16"`` (torch's name); an
    unknown name comes back lower-cased, for the caller to judge."""
    key = name.removeprefix("torch.").lower()
    return DTYPE_ALIASES.get(key, key)


def dtype_name(dtype: object) -> str:
    """``torch.float32`` -> ``"float32"``; a name already (``"float32"``) stays as it is."""
    return str(dtype).removeprefix("torch.")
