"""Seeds per tensor name: torch-free, shared by the rules and the target initialisers."""

from __future__ import annotations

import zlib


def derive_seed(seed: int, name: str) -> int:
    """A seed per tensor name, so a key's fresh values do not depend on what else is reset."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
