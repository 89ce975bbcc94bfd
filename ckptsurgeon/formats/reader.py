"""Open any checkpoint a format family reads as a lazy table; the format is found from
bytes and layout (:mod:`~ckptsurgeon.formats.registry`)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from ckptsurgeon.formats import hub, torch_io
from ckptsurgeon.formats.checkpoint import (
    Checkpoint,
    detect,
    open_detected,
    open_in_snapshot,
    reading,
)


def open_checkpoint(
    path: str | os.PathLike, key: str | None = None, allow_globals: Iterable[str] = ()
) -> Checkpoint:
    """Open ``path`` lazily: headers and indexes are read, tensor data is not.

    ``key`` picks a nested container (``state_dict``, ``model``, ``a/b`` for deeper ones);
    without it the state dict is found automatically and ``Checkpoint.note`` says how.
    ``hf://org/name[@revision]`` opens that model's snapshot in the Hugging Face cache
    (offline); ``Checkpoint.path`` is then the hf:// name, ``files`` the snapshot's files.
    """
    path = os.fspath(path)
    if hub.is_hf(path):
        return open_in_snapshot(path, lambda folder: open_checkpoint(folder, key, allow_globals))
    torch_io.resolve_allowed_globals(allow_globals)  # a bad --allow-global is an error everywhere
    with reading(path):
        ckpt = open_detected(detect(path), path, key, allow_globals)
    assert ckpt is not None  # only a header-only open may decline
    return ckpt
