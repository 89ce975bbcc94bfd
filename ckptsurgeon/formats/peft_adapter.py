"""A PEFT LoRA adapter folder read as its settings and a lazy table of its tensors.

A folder ``peft``'s ``save_pretrained`` writes holds ``adapter_config.json`` and the
weights, ``adapter_model.safetensors`` (or ``adapter_model.bin``, read with
``weights_only=True`` like every torch file here). Only what decides how the adapter merges
is kept from the config; a feature that changes the merge and is not implemented (another
``peft_type``, trainable tokens, LoRA on raw parameters, the LoRA variants other than DoRA)
is refused by name, so an adapter is never merged as something it is not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptsurgeon.errors import InputError, UsageError
from ckptsurgeon.formats import hub
from ckptsurgeon.formats.reader import open_checkpoint
from ckptsurgeon.formats.table import Table

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

# Config fields whose non-empty value changes what merging means, and which are not
# implemented: (field, what it is). Each is refused by name when set.
UNSUPPORTED = (
    ("trainable_token_indices", "trainable tokens"),
    ("target_parameters", "LoRA on raw parameters (target_parameters)"),
    ("layer_replication", "layer replication"),
    ("use_qalora", "QA-LoRA"),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
    ("arrow_config", "Arrow routing"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
    ("velora_config", "VeLoRA"),
    ("monteclora_config", "MonteCLoRA"),
    ("kasa_config", "KaSA"),
)


@dataclass(frozen=True)
class LoraSettings:
    """What decides how a LoRA adapter merges (field names as in PEFT's ``LoraConfig``)."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    use_dora: bool = False


@dataclass(frozen=True)
class Adapter:
    """An opened adapter: its folder, settings, tensors (lazy) and weights file."""

    folder: str
    settings: LoraSettings
    tensors: Table
    weights_file: str


def open_adapter(path: str) -> Adapter:
    """Open the adapter folder at ``path`` (an ``hf://`` name: its cache snapshot).

    InputError (exit 3) when the folder or its weights are missing or unreadable; UsageError
    (exit 2) when ``adapter_config.json`` is missing, malformed in a field that matters, or
    names something this merge does not implement.
    """
    folder = hub.local_path(path)
    if not os.path.exists(folder):
        raise InputError(f"adapter {path}: no such folder")
    if not os.path.isdir(folder):
        raise UsageError(
            f"adapter {path}: not a folder (give the PEFT adapter folder, which holds "
            f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS[0]})"
        )
    settings = read_settings(path, os.path.join(folder, ADAPTER_CONFIG))
    found = [
        os.path.join(folder, n) for n in ADAPTER_WEIGHTS if os.path.isfile(os.path.join(folder, n))
    ]
    if not found:
        raise InputError(f"adapter {path}: no {' or '.join(ADAPTER_WEIGHTS)}")
    ckpt = open_checkpoint(found[0])
    return Adapter(path, settings, ckpt.tensors, found[0])


def read_settings(name: str, config_path: str) -> LoraSettings:
    """The merge settings in ``config_path``, checked field by field."""
    if not os.path.isfile(config_path):
        raise UsageError(f"adapter {name}: no {ADAPTER_CONFIG} (it says what r and alpha are)")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{config_path}: cannot read: {exc}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{config_path}: not a JSON object")
    return settings_from(raw, config_path)


def settings_from(raw: Mapping[str, Any], where: str) -> LoraSettings:
    """Check a parsed ``adapter_config.json`` and keep what the merge needs."""
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise UsageError(f"{where}: peft_type {peft_type!r}: only LORA adapters can be merged")
    for name, what in UNSUPPORTED:
        if raw.get(name):
            raise UsageError(f"{where}: {name} is set: merging {what} is not supported")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower() == "mica":
        raise UsageError(f"{where}: init_lora_weights 'mica': merging MiCA is not supported")
    r = _positive_int(raw.get("r"), "r", where)
    return LoraSettings(
        r=r,
        lora_alpha=_number(raw.get("lora_alpha", 8), "lora_alpha", where),
        use_rslora=_flag(raw, "use_rslora", where),
        rank_pattern={
            k: _positive_int(v, f"rank_pattern[{k!r}]", where)
            for k, v in _mapping(raw, "rank_pattern", where).items()
        },
        alpha_pattern={
            k: _number(v, f"alpha_pattern[{k!r}]", where)
            for k, v in _mapping(raw, "alpha_pattern", where).items()
        },
        fan_in_fan_out=_flag(raw, "fan_in_fan_out", where),
        lora_bias=_flag(raw, "lora_bias", where),
        use_dora=_flag(raw, "use_dora", where),
    )


def _positive_int(value: Any, field: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{where}: {field} is {value!r}, expected a positive integer")
    return value


def _number(value: Any, field: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{where}: {field} is {value!r}, expected a number")
    return value


def _flag(raw: Mapping[str, Any], field: str, where: str) -> bool:
    value = raw.get(field) or False
    if not isinstance(value, bool):
        raise UsageError(f"{where}: {field} is {value!r}, expected true or false")
    return value


def _mapping(raw: Mapping[str, Any], field: str, where: str) -> Mapping[str, Any]:
    value = raw.get(field) or {}
    if not isinstance(value, dict):
        raise UsageError(f"{where}: {field} is {value!r}, expected an object")
    return value
