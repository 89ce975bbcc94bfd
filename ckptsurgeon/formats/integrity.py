"""``inspect --verify``: recompute what a checkpoint recorded about its own bytes.

* safetensors written by ckptsurgeon record a content digest and every tensor's sha256 in
  their header (see :func:`safetensors_io.content_digest`); a sharded index also records
  each shard's digest. Both are recomputed and compared, and a mismatch names the tensor
  and the byte range that changed.
* torch zip files carry a CRC-32 per record, which ``torch.load`` never checks (a flipped
  byte loads silently); they are checked here.
* Anything else (legacy torch pickles, DCP folders, files from other tools) has nothing
  recorded to check against, and the result says so rather than claiming it is intact.

Each family checks its own files (:meth:`~ckptsurgeon.formats.family.Format.verify`); this
module reports the verdicts.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from ckptsurgeon.errors import InputError
from ckptsurgeon.formats import registry

if TYPE_CHECKING:
    from ckptsurgeon.formats.checkpoint import Checkpoint
    from ckptsurgeon.formats.safetensors_io import Verdict


def verify_checkpoint(ckpt: Checkpoint) -> list[Verdict]:
    """One verdict per file of ``ckpt`` (``ok``, ``corrupt`` or ``unrecorded``), from the
    family that reads its format (see Format.verify)."""
    return registry.family_of(ckpt.format).format.verify(ckpt)


def verify_report(verdicts: list[Verdict]) -> dict:
    """The ``verify`` object of ``inspect --json --verify``."""
    return {
        "ok": all(v.status != "corrupt" for v in verdicts),
        "verified": sum(v.status == "ok" for v in verdicts),
        "unrecorded": sum(v.status == "unrecorded" for v in verdicts),
        "files": [asdict(v) for v in verdicts],
    }


def raise_if_corrupt(verdicts: list[Verdict]) -> None:
    """InputError (exit 3) naming every corrupt file and what changed in it."""
    corrupt = [v for v in verdicts if v.status == "corrupt"]
    if corrupt:
        raise InputError("verify failed: " + "; ".join(f"{v.path}: {v.detail}" for v in corrupt))


def verify_lines(verdicts: list[Verdict]) -> list[str]:
    """Human lines for ``inspect --verify`` when nothing is corrupt."""
    lines = []
    for v in verdicts:
        if v.status == "ok":
            what = f"sha256 {v.digest[:16]}... matches" if v.digest else v.detail
            lines.append(f"verified {v.path}: {what}")
        else:
            lines.append(f"NOT verified {v.path}: {v.detail}")
    return lines
