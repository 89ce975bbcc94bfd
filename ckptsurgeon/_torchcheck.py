"""Is the installed torch's weights-only unpickler one we can lean on?

Read from package metadata, so the CLI can warn at start-up without importing torch.
"""

from __future__ import annotations

import re
from importlib import metadata

# CVE-2026-24747: SETITEM/SETITEMS on non-dict objects in torch's weights-only unpickler,
# fixed in torch 2.10. Older releases still refuse unknown globals, but a crafted pickle
# may get past the unpickler's other checks.
FIXED_IN = (2, 10)
CVE = "CVE-2026-24747"

warned = False  # set once the warning has been shown (CLI start-up or first pickle)


def installed_torch() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def unpickler_warning(version: str | None) -> str | None:
    """The warning for torch ``version`` ("2.9.1+cu128"), or None when it has the fix."""
    match = re.match(r"(\d+)\.(\d+)", version or "")
    if match is None or (int(match.group(1)), int(match.group(2))) >= FIXED_IN:
        return None
    return (
        f"torch {version} is older than {FIXED_IN[0]}.{FIXED_IN[1]}: its weights-only "
        f"unpickler has {CVE} (SETITEM on non-dicts). Upgrade torch "
        f"(pip install 'torch>={FIXED_IN[0]}.{FIXED_IN[1]}') before reading untrusted pickles."
    )
