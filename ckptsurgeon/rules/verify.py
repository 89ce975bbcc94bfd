"""The rules file's ``verify:`` section as pydantic models (SPEC.md, "Verification").

Loading strictly proves shapes; this section asks for proof of function: a reference model
that the *source* loads into, inputs, and what to compare against the target model loaded
with the result. No torch import here: ``validate`` stays fast.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ckptsurgeon.formats.dtypes import FLOAT_DTYPES, canonical_dtype
from ckptsurgeon.rules.config import DType, Strict
from ckptsurgeon.rules.ops import AnyOp


class ReferenceSpec(Strict):
    """The model the source checkpoint loads into, optionally after its own rules."""

    model: str = Field(description="pkg.module:callable or file.py:callable")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    rules: list[AnyOp] = Field(  # type: ignore[valid-type]
        default_factory=list, description="applied to the source before it loads"
    )


class InputSpec(Strict):
    """One seeded random input: positional, or the keyword argument ``name``."""

    shape: list[int] = Field(min_length=1)
    dtype: DType = "float32"
    name: str | None = Field(None, description="pass as this keyword argument")
    low: int = 0
    high: int | None = Field(None, description="integer inputs: values in [low, high)")

    @model_validator(mode="after")
    def _integer_range(self) -> InputSpec:
        if any(d <= 0 for d in self.shape):
            raise ValueError(f"shape {self.shape}: every dimension must be positive")
        floating = canonical_dtype(self.dtype) in FLOAT_DTYPES
        if not floating and self.dtype != "bool" and self.high is None:
            raise ValueError(f"an integer input ({self.dtype}) needs high (values in [low, high))")
        if self.high is not None and self.high <= self.low:
            raise ValueError(f"high ({self.high}) must be greater than low ({self.low})")
        return self


class ModulePair(Strict):
    """Outputs of a named submodule (or a method such as timm's ``forward_features``) of
    each model: a new head is left out by comparing the features that feed it."""

    reference: str
    candidate: str


class VerifySpec(Strict):
    """Does the result compute what the source computed?"""

    reference: ReferenceSpec
    inputs: list[InputSpec] = Field(default_factory=list)
    file: str | None = Field(None, description="recorded inputs: tensor names are keywords")
    compare: list[Literal["output"] | ModulePair] = Field(default_factory=lambda: ["output"])
    atol: float | None = Field(None, ge=0, description="default by dtype (1e-5 for float32)")
    rtol: float | None = Field(None, ge=0, description="default by dtype (1e-4 for float32)")
    device: str = Field("cpu", description="cpu or cuda[:N]")

    @model_validator(mode="after")
    def _inputs_given(self) -> VerifySpec:
        if bool(self.inputs) == bool(self.file):
            raise ValueError("give inputs (a list) or file (recorded inputs), exactly one")
        if not self.compare:
            raise ValueError("compare: give output and/or {reference, candidate} pairs")
        return self
