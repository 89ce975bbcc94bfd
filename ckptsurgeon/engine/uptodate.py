"""``apply --skip-up-to-date``: is the output already what this job would write?

Every safetensors output records, in its metadata, what it was made from: the tool version,
a digest of the normalised rules document (with the command line's overrides), and the
identity of every input file (path, size, modification time in nanoseconds). The check
compares that record with the inputs as they are now, reading headers and ``stat`` only, no
tensor data and no torch, so a pipeline step whose inputs did not change costs nothing.

An input rewritten in any way (even one byte) gets a new modification time, so the job
reruns; as with make and ninja, a change that restores both size and modification time
is not seen. Outputs in torch formats carry no metadata and are never up to date.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from ckptsurgeon._version import __version__
from ckptsurgeon.formats.hf_folder import output_metadata

RECORD_KEY = "ckptsurgeon.inputs"


def file_identity(path: str) -> list[dict[str, Any]]:
    """``path`` (a file, or every file directly inside a folder) as path, size, mtime."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if not n.startswith("."))
        files = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
    else:
        files = [path]
    out = []
    for file in files:
        st = os.stat(file)  # follows links: a cache snapshot's blob is the input
        out.append({"path": os.path.abspath(file), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def make_record(document: dict[str, Any], inputs: list[str]) -> str:
    """The record an output carries: version, document digest, input identities (JSON)."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
    record = {
        "version": __version__,
        "rules_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "inputs": [entry for path in inputs for entry in file_identity(path)],
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def recorded(output: str) -> str | None:
    """The record in the output's metadata, or None (no output, not a safetensors output,
    or one another tool wrote: the job reruns and replaces it)."""
    return output_metadata(output).get(RECORD_KEY)


def is_up_to_date(output: str | None, record: str) -> bool:
    """Does ``output`` exist and carry exactly ``record``?"""
    return output is not None and recorded(output) == record
