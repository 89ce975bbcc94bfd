"""Which kind of output a path (and an ``output.format``) names, without torch: the rules
file's schema checks the two agree, and the writer dispatches on the kind. The kinds are
the format families' outputs (:mod:`~ckptsurgeon.formats.registry`)."""

from __future__ import annotations

from ckptsurgeon.formats import registry


def output_kind(path: str, format: str | None = None) -> str:
    """``safetensors``, ``torch``, ``folder`` (Hugging Face-style, safetensors inside),
    ``dcp`` or a plug-in's kind: from the output path's suffix, or from ``format`` (a name
    :func:`~ckptsurgeon.formats.registry.output_format_names` lists) when given, which
    must agree with the suffix (UsageError otherwise)."""
    return registry.output_for(path, format)[1].kind
