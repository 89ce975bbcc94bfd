"""The ``target:`` section as a pydantic model (no torch import: ``validate`` stays fast)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from ckptsurgeon.schema import Strict


class TargetSpec(Strict):
    """What the result must load into: a model, a reference checkpoint or a manifest."""

    model: str | None = Field(None, description='"pkg.module:callable" or "file.py:callable"')
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    key: str | None = Field(None, description="container inside a reference checkpoint")
    allow_globals: list[str] = Field(
        default_factory=list, description="module.Name classes admitted in its pickle"
    )
    manifest: str | None = Field(None, description="JSON printed by `inspect --json`")

    @model_validator(mode="after")
    def _exactly_one(self) -> TargetSpec:
        given = [k for k in ("model", "checkpoint", "manifest") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("target needs exactly one of model, checkpoint, manifest")
        if self.kwargs and not self.model:
            raise ValueError("kwargs only go with target.model")
        if (self.key or self.allow_globals) and not self.checkpoint:
            raise ValueError("key and allow_globals only go with target.checkpoint")
        return self
