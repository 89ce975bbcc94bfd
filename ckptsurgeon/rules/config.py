"""The rules file as pydantic models: validated at the edge, unknown fields forbidden.

Nothing here imports torch, so ``validate`` and ``schema`` stay fast. The rule ops live in
:mod:`ckptsurgeon.rules.ops`, one class each, holding their fields and their behaviour.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from ckptsurgeon.errors import UsageError
from ckptsurgeon.formats import registry
from ckptsurgeon.formats.dtypes import FLOAT_DTYPES, KNOWN_NAMES, OTHER_DTYPES, canonical_dtype
from ckptsurgeon.formats.kinds import output_kind
from ckptsurgeon.rules.patterns import show_pattern
from ckptsurgeon.schema import Strict
from ckptsurgeon.targets.config import TargetSpec

__all__ = ["Strict", "TargetSpec"]

# Initialisations available where there is no model to take them from.
InitName = Literal["zeros", "ones", "normal", "xavier_uniform", "kaiming_uniform"]


def _check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {show_pattern(pattern)}: {exc}") from None
    return pattern


def _check_dtype(name: str) -> str:
    if canonical_dtype(name) not in (*FLOAT_DTYPES, *OTHER_DTYPES):
        raise ValueError(f"unknown dtype {name!r}; one of {', '.join(KNOWN_NAMES)}")
    return name


def _check_float_dtype(name: str) -> str:
    _check_dtype(name)
    if canonical_dtype(name) not in FLOAT_DTYPES:
        raise ValueError(
            f"{name!r} is not a floating-point dtype: output.dtype converts every floating "
            "tensor; to change particular tensors, use a cast rule with a pattern"
        )
    return name


Pattern = Annotated[
    str, AfterValidator(_check_regex), Field(description="Python regex (re.search)")
]
DType = Annotated[str, AfterValidator(_check_dtype), Field(description="e.g. bfloat16, float16")]
FloatDType = Annotated[
    str, AfterValidator(_check_float_dtype), Field(description="e.g. bfloat16, float16")
]


# The formats that write, plug-ins' included: the schema lists them, validate checks them.
OutputFormat = Literal[registry.output_format_names()]  # type: ignore[valid-type]


class SourceSpec(Strict):
    path: str
    key: str | None = Field(None, description="Nested container: state_dict, model, a/b, ...")
    allow_globals: list[str] = Field(
        default_factory=list, description="module.Name classes admitted in pickles"
    )


class OutputSpec(Strict):
    path: str | None = Field(None, description=".safetensors, .pt/.pth/.bin, or a folder")
    dtype: FloatDType | None = None
    max_shard_size: str | int | None = Field(
        None, description='e.g. "5GB" (decimal units); for dcp: the largest data file'
    )
    format: OutputFormat | None = Field(
        None,
        description="dcp: a torch.distributed.checkpoint folder (a path with no suffix); "
        "a plug-in's format by its name; null: from the path's suffix",
    )
    fsync: bool = Field(
        True, description="wait for the disk (survives power loss); false: as fast as cp -r"
    )
    copy_extras: bool = Field(
        True,
        description="folder output from a folder source: carry config, tokenizer and "
        "preprocessor files along; a transformers target writes its own config.json",
    )

    @field_validator("format")
    @classmethod
    def _format_fits_path(cls, format: str | None, info: ValidationInfo) -> str | None:
        path = info.data.get("path")  # validated first: declared before format
        if format is not None and path is not None:
            try:
                output_kind(path, format)
            except UsageError as exc:
                raise ValueError(str(exc)) from None
        return format


class CheckSpec(Strict):
    allow_missing: list[Pattern] = Field(default_factory=list)
    allow_unexpected: list[Pattern] = Field(default_factory=list)
