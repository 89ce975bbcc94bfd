"""``inspect --verify``: recompute what a checkpoint recorded about its own bytes.

* safetensors written by ckptsurgeon record a content digest and every tensor's sha256 in
  their header (see :func:`safetensors_io.content_digest`); a sharded index also records
  each shard's digest. Both are recomputed and compared, and a mismatch names the tensor
  and the byte range that changed.
* torch zip files carry a CRC-32 per record, which ``torch.load`` never checks (a flipped
  byte loads silently); they are checked here.
* Anything else (legacy torch pickles, DCP folders, files from other tools) has nothing
  recorded to check against, and the result says so rather than claiming it is intact.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import asdict

from ckptsurgeon.errors import InputError
from ckptsurgeon.formats import safetensors_io
from ckptsurgeon.formats.index import read_index
from ckptsurgeon.formats.reader import Checkpoint
from ckptsurgeon.formats.safetensors_io import Verdict


def verify_checkpoint(ckpt: Checkpoint) -> list[Verdict]:
    """One verdict per file of ``ckpt`` (``ok``, ``corrupt`` or ``unrecorded``)."""
    if ckpt.format == "safetensors":
        return [safetensors_io.verify_safetensors(f) for f in ckpt.files]
    if ckpt.format == "safetensors-sharded":
        return _verify_sharded(ckpt.files[0])
    if ckpt.format in ("torch-zip", "torch-sharded"):
        return [_verify_torch(f) for f in ckpt.files if not f.endswith(".index.json")]
    if ckpt.format == "torch-legacy":
        return [Verdict(f, "unrecorded", "legacy torch format: no checksums") for f in ckpt.files]
    return [Verdict(ckpt.path, "unrecorded", f"{ckpt.format}: no recorded checksums")]


def _verify_sharded(index_path: str) -> list[Verdict]:
    index = read_index(index_path)
    recorded = index.metadata.get(safetensors_io.DIGEST_KEY)
    if not isinstance(recorded, dict):
        recorded = {}
    folder = os.path.dirname(index_path)
    verdicts = []
    for shard in sorted(index.shards):
        expected = recorded.get(os.path.relpath(shard, folder))
        verdicts.append(
            safetensors_io.verify_safetensors(
                shard, expected if isinstance(expected, str) else None
            )
        )
    return verdicts


def _verify_torch(path: str) -> Verdict:
    if not zipfile.is_zipfile(path):
        return Verdict(path, "unrecorded", "legacy torch format: no checksums")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return Verdict(path, "corrupt", f"unreadable zip archive ({exc})")
    if bad is not None:
        return Verdict(
            path, "corrupt", f"record {bad!r} fails its CRC-32 (torch.load does not check these)"
        )
    return Verdict(path, "ok", "every zip record matches its CRC-32")


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
