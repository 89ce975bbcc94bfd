"""``ckptsurgeon env``: what a bug report needs, as ``transformers env`` and ``hf env`` print.

Versions come from package metadata, so a library that is installed but broken still shows;
torch itself is imported only to list CUDA devices.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Any

from ckptsurgeon import _torchcheck, plugins
from ckptsurgeon._version import __version__
from ckptsurgeon.formats import registry

LIBRARIES = (
    "torch", "safetensors", "numpy", "pydantic", "torchvision", "transformers", "timm",
    "huggingface_hub", "peft", "deepspeed", "gguf", "lightning",
)  # fmt: skip


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cuda() -> dict[str, Any]:
    try:
        import torch
    except Exception as exc:  # a broken torch is exactly what a report should show
        return {"available": False, "error": f"importing torch failed: {exc}"}
    if not torch.cuda.is_available():
        return {"available": False, "devices": []}
    devices = [
        {"index": i, "name": torch.cuda.get_device_name(i)}
        for i in range(torch.cuda.device_count())
    ]
    return {"available": True, "cuda": torch.version.cuda, "devices": devices}


def collect() -> dict[str, Any]:
    """Everything ``env`` prints, as one JSON-ready object."""
    torch_version = _torchcheck.installed_torch()
    warning = _torchcheck.unpickler_warning(torch_version)
    return {
        "ckptsurgeon": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "torch_weights_only": {
            "cve": _torchcheck.CVE,
            "fixed": warning is None and torch_version is not None,
            "warning": warning,
        },
        "cuda": _cuda(),
        "formats": [_format(f) for f in registry.families()],
        "plugins": [p.to_dict() for p in _plugins()],
    }


def _format(family: registry.Family) -> dict[str, Any]:
    fmt = family.format
    return {
        "name": fmt.name,
        "reads": list(fmt.formats),
        "writes": [o.kind for o in fmt.outputs],
        "plugin": family.distribution,
    }


def _plugins() -> list[plugins.PluginRecord]:
    """Every plug-in entry point, loaded or skipped: building the format registry and the
    rules' op union loads them."""
    import ckptsurgeon.rules.ops  # noqa: F401 (loads the ops group)

    registry.families()
    return plugins.found()


def lines(info: dict[str, Any]) -> list[str]:
    out = [
        f"ckptsurgeon {info['ckptsurgeon']}",
        f"python {info['python']} ({info['platform']})",
    ]
    for name, version in info["libraries"].items():
        out.append(f"{name}: {version or 'not installed'}")
    safe = info["torch_weights_only"]
    out.append(
        f"torch weights-only unpickler: {'has the fix for ' + safe['cve'] if safe['fixed'] else 'NOT fixed: ' + (safe['warning'] or 'torch not installed')}"
    )
    cuda = info["cuda"]
    if cuda.get("devices"):
        out += [f"cuda {cuda['cuda']}: {d['index']}: {d['name']}" for d in cuda["devices"]]
    else:
        out.append("cuda: " + cuda.get("error", "no devices"))
    for fmt in info["formats"]:
        writes = f"; writes {', '.join(fmt['writes'])}" if fmt["writes"] else ""
        origin = f" (plug-in {fmt['plugin']})" if fmt["plugin"] else ""
        out.append(f"format {fmt['name']}{origin}: reads {', '.join(fmt['reads'])}{writes}")
    for p in info["plugins"]:
        state = "loaded" if p["loaded"] else f"SKIPPED: {p['problem']}"
        out.append(f"plug-in {p['name']} ({p['group']}) from {p['distribution']}: {state}")
    if not info["plugins"]:
        out.append("plug-ins: none installed")
    return out
