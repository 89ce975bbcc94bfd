"""DeepSpeed ZeRO checkpoint folders: which tag, which rank files, which stage (torch-free).

A ZeRO checkpoint is a folder holding ``latest`` (the name of the newest tag) and one tag
folder per save (``global_step14/``), or such a tag folder itself. A tag folder holds
``*_model_states.pt`` (shapes, buffers, frozen parameters; one file for stages 1 and 2, one
per data-parallel rank for stage 3) and ``*_optim_states.pt``, one per rank, holding that
rank's partition of the fp32 master weights. The pickles are read with
:func:`~ckptsurgeon.formats.torch_zip.load_structure`, admitting exactly the DeepSpeed
classes in :data:`DEEPSPEED_RECORDS` as inert records; nothing of DeepSpeed is imported, and
the ``zero_to_fp32.py`` a checkpoint folder carries is never run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ckptsurgeon.errors import InputError
from ckptsurgeon.formats.index import check_relative_name
from ckptsurgeon.formats.torch_zip import PickledRecord, load_structure, record_classes

LATEST_FILE = "latest"
MODEL_STATES_SUFFIX = "_model_states.pt"
OPTIM_STATES_SUFFIX = "_optim_states.pt"

# The classes DeepSpeed's checkpoint pickles name: found by saving ZeRO 1, 2 and 3
# checkpoints (fp32 and bf16) and listing their globals; DynamicLossScaler is what fp16
# training saves in LossScaler's place, and argparse.Namespace what training scripts
# (Megatron-DeepSpeed) pass as client state. Each is read as a record, nothing more.
DEEPSPEED_RECORDS: dict[str, type[PickledRecord]] = record_classes([
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "argparse.Namespace",
])  # fmt: skip

# Rank file names: "[bf16_]zero_pp_rank_<dp>_mp_rank_<mp>_optim_states.pt" and, for stage
# 3, "zero_pp_rank_<dp>_mp_rank_<mp>_model_states.pt"; "mp_rank_<mp>_model_states.pt" else.
_RANK_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(?:optim|model)_states\.pt")
_MODEL_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt")
_TAG_LIMIT = 4096

ZERO_FORMATS = ("deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3")


@dataclass(frozen=True)
class ZeroFolder:
    """A ZeRO checkpoint's tag folder and its files, natural-sorted as ``zero_to_fp32``
    sorts them (rank 10 after rank 2)."""

    path: str  # as given: the folder holding ``latest``, or the tag folder
    tag: str
    tag_dir: str
    model_files: list[str]
    optim_files: list[str]


def is_zero_folder(path: str) -> bool:
    """A folder holding ``latest`` or ``*_model_states.pt`` files."""
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, LATEST_FILE)):
        return True
    return any(n.endswith(MODEL_STATES_SUFFIX) for n in os.listdir(path))


def natural_key(name: str) -> list[int | str]:
    """``zero_pp_rank_2`` before ``zero_pp_rank_10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def locate(path: str) -> ZeroFolder:
    """The tag folder ``path`` means, and its rank files.

    Raises InputError when ``latest`` names no folder inside ``path``, or the tag folder
    holds no model states or files of a layout this reader does not handle.
    """
    latest = os.path.join(path, LATEST_FILE)
    if os.path.isfile(latest):
        tag = _read_tag(latest)
        tag_dir = os.path.join(path, tag)
        if not os.path.isdir(tag_dir):
            raise InputError(f"{latest}: names tag {tag!r}, but there is no folder {tag_dir}")
    else:
        tag_dir = path
        tag = os.path.basename(os.path.normpath(os.path.abspath(path)))
    names = sorted(os.listdir(tag_dir), key=natural_key)
    model = [n for n in names if n.endswith(MODEL_STATES_SUFFIX)]
    optim = [n for n in names if n.endswith(OPTIM_STATES_SUFFIX)]
    if not model:
        raise InputError(
            f"{tag_dir}: no *{MODEL_STATES_SUFFIX} files (not a DeepSpeed checkpoint tag folder)"
        )
    for name in model + optim:
        match = _RANK_FILE.fullmatch(name) or _MODEL_FILE.fullmatch(name)
        if match is None:
            raise InputError(
                f"{os.path.join(tag_dir, name)}: not a ZeRO data-parallel rank file "
                "(mixture-of-experts and pipeline checkpoints are not read)"
            )
        if int(match.group(match.lastindex or 1)) != 0:
            raise InputError(
                f"{os.path.join(tag_dir, name)}: a model-parallel rank other than 0; "
                "tensor- or pipeline-parallel ZeRO checkpoints are not read"
            )
    return ZeroFolder(
        path,
        tag,
        tag_dir,
        [os.path.join(tag_dir, n) for n in model],
        [os.path.join(tag_dir, n) for n in optim],
    )


def rank_of(file: str) -> int | None:
    """The data-parallel rank a rank file's name gives; None for ``mp_rank_00_model_states``."""
    match = _RANK_FILE.fullmatch(os.path.basename(file))
    return int(match.group(1)) if match else None


def _read_tag(latest: str) -> str:
    with open(latest, "rb") as f:
        raw = f.read(_TAG_LIMIT + 1)
    try:
        tag = raw.decode().strip()
    except UnicodeDecodeError:
        raise InputError(f"{latest}: not a tag name (not UTF-8 text)") from None
    if len(raw) > _TAG_LIMIT or not tag or "/" in tag:
        raise InputError(
            f"{latest}: tag {tag[:80]!r} is not the name of a folder inside "
            f"{os.path.dirname(latest) or '.'}"
        )
    try:
        check_relative_name(latest, tag)
    except InputError:
        raise InputError(
            f"{latest}: tag {tag[:80]!r} is not the name of a folder inside "
            f"{os.path.dirname(latest) or '.'}"
        ) from None
    return tag


def load_state(file: str) -> dict[str, Any]:
    """One rank file's top-level dict, tensors as stored-tensor records."""
    state = load_structure(file, DEEPSPEED_RECORDS)
    if not isinstance(state, Mapping):
        raise InputError(f"{file}: holds a {type(state).__name__}, not a DeepSpeed state dict")
    return dict(state)


def as_int(value: Any) -> int | None:
    """An int, or an int enum member's value (``ZeroStageEnum.weights`` is 3)."""
    if isinstance(value, PickledRecord) and len(value.args) == 1:
        value = value.args[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def optimizer_state(file: str, state: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ZeRO optimizer's state in an ``*_optim_states.pt`` dict."""
    inner = state.get("optimizer_state_dict")
    if not isinstance(inner, Mapping) or as_int(inner.get("zero_stage")) is None:
        raise InputError(f"{file}: no ZeRO optimizer state (optimizer_state_dict.zero_stage)")
    return inner


def zero_stage(folder: ZeroFolder) -> int:
    """The ZeRO stage: rank 0's optimizer state says; without optimizer files, the
    DeepSpeed config saved beside the model states."""
    if folder.optim_files:
        file = folder.optim_files[0]
        stage = as_int(optimizer_state(file, load_state(file))["zero_stage"])
    else:
        file = folder.model_files[0]
        config = load_state(file).get("ds_config")
        zero = config.get("zero_optimization") if isinstance(config, Mapping) else None
        stage = as_int(zero.get("stage", 0)) if isinstance(zero, Mapping) else 0
    if stage not in (1, 2, 3):
        raise InputError(f"{file}: ZeRO stage {stage}; only stages 1, 2 and 3 are read")
    return stage  # type: ignore[return-value]


def zero_format(folder: ZeroFolder) -> str:
    """``deepspeed-zero<stage>``."""
    return f"deepspeed-zero{zero_stage(folder)}"
