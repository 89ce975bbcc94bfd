"""Which kind of output a path (and an ``output.format``) names, without torch: the rules
file's schema checks the two agree, and the writer dispatches on the kind."""

from __future__ import annotations

import os

from ckptsurgeon.errors import UsageError
from ckptsurgeon.formats.checkpoint import TORCH_OUTPUT_SUFFIXES

OUTPUT_FORMATS = ("safetensors", "torch", "dcp")
FOLDER_KINDS = ("folder", "dcp")  # the output kinds written as a folder


def output_kind(path: str, format: str | None = None) -> str:
    """``safetensors``, ``torch``, ``folder`` (Hugging Face-style, safetensors inside) or
    ``dcp``: from the output path's suffix, or from ``format`` (one of OUTPUT_FORMATS) when
    given, which must agree with the suffix (UsageError otherwise)."""
    if format == "dcp":
        if path.endswith((".safetensors", *TORCH_OUTPUT_SUFFIXES)):
            raise UsageError(
                f"output {path}: format dcp writes a folder, but the path names a "
                f"{os.path.splitext(path)[1]} file; give a path with no suffix"
            )
        return "dcp"
    if path.endswith(".safetensors"):
        kind = "safetensors"
    elif path.endswith(TORCH_OUTPUT_SUFFIXES):
        kind = "torch"
    elif os.path.splitext(path)[1]:
        raise UsageError(
            f"output {path}: unknown suffix; use .safetensors, .pt/.pth/.bin, or no suffix "
            "for a Hugging Face-style folder (or format dcp for a DCP folder)"
        )
    else:
        kind = "folder"
    if format is not None and format not in OUTPUT_FORMATS:
        raise UsageError(f"output format {format!r}: one of {', '.join(OUTPUT_FORMATS)}")
    if format == "torch" and kind != "torch":
        raise UsageError(
            f"output {path}: format torch writes one pickle file; give a .pt, .pth or .bin path"
        )
    if format == "safetensors" and kind == "torch":
        raise UsageError(
            f"output {path}: format safetensors, but the {os.path.splitext(path)[1]} suffix "
            "names a torch pickle; give a .safetensors path or a folder"
        )
    return kind
