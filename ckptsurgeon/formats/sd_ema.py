"""Stable Diffusion's EMA copy, read under the names of the weights it shadows.

The ``LitEma`` module of CompVis' latent diffusion code (Stable Diffusion v1 ``.ckpt``
files) keeps its shadow weights in the same state dict as the model, each under
``model_ema.`` followed by the model's parameter name with every dot removed:
``model.diffusion_model.input_blocks.0.0.weight`` is shadowed by
``model_ema.diffusion_modelinput_blocks00weight``; ``model_ema.decay`` and
``model_ema.num_updates`` are its bookkeeping. Dots cannot be put back from the name alone
(``input_blocks00`` is ``input_blocks.0.0``), so each shadow is matched to the entry of the
same checkpoint whose name, with its dots removed, ends in the shadow's name, and whose
shape is the same.
"""

from __future__ import annotations

from collections.abc import Iterable

from ckptsurgeon.errors import InputError, UsageError
from ckptsurgeon.formats.table import Table


def undotted(table: Table, prefix: str, where: str) -> Table:
    """The entries under ``prefix`` (``model_ema``), named as the entries they shadow.

    Scalars with no counterpart (``decay``, ``num_updates``) are left out. UsageError when
    nothing sits under ``prefix``; InputError when a shadow matches no entry, or several.
    """
    head = prefix.rstrip(".") + "."
    shadows = {n[len(head) :]: ref for n, ref in table.items() if n.startswith(head)}
    if not shadows:
        raise UsageError(f"{where}: no entries named '{head}*' (dotless EMA copy)")
    candidates = _by_dotless_suffix(n for n in table if not n.startswith(head))
    out: Table = {}
    unmatched: list[str] = []
    for short, ref in shadows.items():
        found = [n for n in candidates.get(short, ()) if table[n].shape == ref.shape]
        if len(found) > 1:
            raise InputError(
                f"{where}: {head + short!r} could shadow any of {', '.join(map(repr, found))}"
            )
        if found:
            out[found[0]] = ref
        elif ref.shape:
            unmatched.append(head + short)
    if unmatched:
        raise InputError(
            f"{where}: {len(unmatched)} entries under '{head}' shadow no entry of the same "
            f"shape whose name without dots ends in theirs (first: {unmatched[0]!r})"
        )
    return out


def _by_dotless_suffix(names: Iterable[str]) -> dict[str, list[str]]:
    """Each name under every dot-separated suffix of it, dots removed: ``a.b.c`` under
    ``abc``, ``bc`` and ``c``."""
    index: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        for start in range(len(parts)):
            index.setdefault("".join(parts[start:]), []).append(name)
    return index
