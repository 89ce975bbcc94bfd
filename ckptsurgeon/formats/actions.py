"""A tensor's history in a plan, as records (no torch import: rules build them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    """One step of a tensor's history: what happened (``renamed``, ``cast``, ``split``...),
    the original keys it came from when that is news, and a detail (``to float16``).

    ``str()`` is the report's text: ``renamed from module.fc.weight``,
    ``split from qkv.weight [0:64] on dim 0``.
    """

    verb: str
    detail: str = ""
    sources: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = self.verb
        if self.sources:
            text += " from " + ", ".join(self.sources)
        return f"{text} {self.detail}" if self.detail else text

    @property
    def summary(self) -> str:
        """The plan table's column: the verb, and the detail when no source is named."""
        return self.verb if self.sources else str(self)
