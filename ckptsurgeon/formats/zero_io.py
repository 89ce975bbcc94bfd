"""DeepSpeed ZeRO checkpoints (stages 1, 2 and 3) as the consolidated fp32 state dict.

The table is what DeepSpeed's ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``
returns, name for name, in its order and bit for bit: buffers first (floating ones as
fp32), then frozen parameters, then the trainable ones cut from the ranks' fp32 master
weights, then the tied (shared) names. Each parameter is read from its ranks' flat groups
when it is loaded, and only its own bytes are read, so consolidating a model takes the
memory of its largest tensor, not of the model. Without optimizer files the module weights
saved in ``*_model_states.pt`` are read instead, and the checkpoint's note says so.

The layout, as DeepSpeed saves it:

* stages 1 and 2: rank ``r``'s ``single_partition_of_fp32_groups[g]`` is the ``r``-th
  slice of param group ``g`` flattened; the ranks' slices, joined, hold the group's
  parameters one after another, each followed by its ``param_alignment_paddings`` entry
  (when saved), the group's end padded to a multiple of ``2 * world_size``.
* stage 3: each parameter is split into ``ceil(numel / world_size)`` elements per rank
  (the last rank's part padded); rank ``r``'s ``fp32_flat_groups``, joined, hold its part
  of every parameter in ``param_shapes`` order. Frozen parameters are split the same way
  across the ranks' ``frozen_param_fragments``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ckptsurgeon.errors import InputError
from ckptsurgeon.formats.checkpoint import Checkpoint
from ckptsurgeon.formats.safetensors_header import FileId, file_id
from ckptsurgeon.formats.spans import ByteSpan, CastSpan, open_span, read_exactly
from ckptsurgeon.formats.table import Table, TensorRef
from ckptsurgeon.formats.torch_zip import StoredTensor
from ckptsurgeon.formats.zero_folder import (
    ZeroFolder,
    as_int,
    load_state,
    locate,
    optimizer_state,
    rank_of,
    zero_stage,
)

FROM_OPTIMIZER = "optimizer fp32 master weights"
FROM_MODULE = "module weights"


@dataclass(frozen=True)
class _Piece:
    """``length`` elements of a stored tensor, from element ``start`` (row-major)."""

    tensor: StoredTensor
    start: int
    length: int


@dataclass
class _ModelState:
    """What ``zero_to_fp32`` takes from one ``*_model_states.pt``."""

    file: str
    module: dict[str, Any]
    buffer_names: list[str]
    param_shapes: list[dict[str, tuple[int, ...]]]
    frozen_shapes: dict[str, tuple[int, ...]]
    frozen_fragments: dict[str, StoredTensor]
    shared: list[tuple[str, str]]
    world_size: int | None
    ds_version: str | None


class _Reader:
    """Builds refs over one folder's files, remembering each file's identity."""

    def __init__(self) -> None:
        self._ids: dict[str, FileId] = {}

    def file_id(self, path: str) -> FileId:
        if path not in self._ids:
            self._ids[path] = file_id(os.stat(path))
        return self._ids[path]

    def span(self, piece: _Piece) -> ByteSpan:
        offset, length = piece.tensor.byte_range(piece.start, piece.length)
        return ByteSpan(piece.tensor.path, offset, length, self.file_id(piece.tensor.path))

    def ref(
        self,
        pieces: Sequence[_Piece],
        shape: tuple[int, ...],
        source: str,
        as_float: bool = False,
    ) -> TensorRef:
        """The tensor of ``shape`` whose row-major elements are ``pieces`` one after
        another; converted to fp32 when ``as_float`` (buffers, as ``zero_to_fp32`` does)."""
        dtype = _torch_dtype(pieces[0].tensor.dtype) if pieces else torch.float32
        spans = [self.span(p) for p in pieces]
        load = _loader(spans, dtype, shape)
        whole = spans[0] if len(spans) == 1 else None
        if as_float and dtype.is_floating_point and dtype != torch.float32:
            return TensorRef(
                shape,
                torch.float32,
                lambda: load().float(),
                sources=(source,),
                cast_from=CastSpan(whole, dtype) if whole else None,
            )
        return TensorRef(shape, dtype, load, span=whole, sources=(source,))

    def stored(self, tensor: StoredTensor, source: str, as_float: bool = False) -> TensorRef:
        """A whole stored tensor (a buffer, a frozen parameter, a module weight)."""
        if tensor.is_contiguous:
            return self.ref([_Piece(tensor, 0, tensor.numel)], tensor.shape, source, as_float)
        base = _strided_ref(tensor, self.file_id(tensor.path), source)
        if as_float and base.dtype.is_floating_point and base.dtype != torch.float32:
            return TensorRef(
                base.shape, torch.float32, lambda: base.load().float(), None, (source,)
            )
        return base


def _loader(
    spans: Sequence[ByteSpan], dtype: torch.dtype, shape: tuple[int, ...]
) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        out = torch.empty(sum(s.length for s in spans), dtype=torch.uint8)
        view = memoryview(out.numpy())
        at = 0
        for span in spans:
            with open_span(span) as fd:
                read_exactly(fd, span, 0, view[at : at + span.length])
            at += span.length
        return out.view(dtype).view(shape)

    return load


def _strided_ref(tensor: StoredTensor, fid: FileId, source: str) -> TensorRef:
    """A stored tensor that is not dense row-major: its storage's bytes, viewed as torch would."""
    storage = ByteSpan(tensor.path, tensor.offset, tensor.storage_bytes, fid)
    dtype = _torch_dtype(tensor.dtype)

    def load() -> torch.Tensor:
        flat = _loader([storage], dtype, (tensor.storage_bytes // tensor.itemsize,))()
        view = flat.as_strided(tensor.shape, tensor.stride, tensor.storage_offset)
        return view.contiguous()

    return TensorRef(tensor.shape, dtype, load, sources=(source,))


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"dtype {name} is not known to this torch")
    return dtype


def open_zero(path: str) -> Checkpoint:
    """A lazy table over the ZeRO checkpoint at ``path`` (the folder holding ``latest``, or
    a tag folder), as ``zero_to_fp32`` would consolidate it.

    ``Checkpoint.format`` is ``deepspeed-zero<stage>``; ``metadata`` gives the stage,
    world size, tag and where the weights come from (``weights_from``), and ``note`` says
    the same in a sentence. Raises InputError for a missing rank file, ranks that disagree,
    flat groups too short for the shapes, or a ``latest`` that names no folder inside.
    """
    folder = locate(path)
    stage = zero_stage(folder)
    models = [_model_state(f) for f in folder.model_files]
    reader = _Reader()
    if folder.optim_files:
        world, groups, paddings = _flat_groups(folder, stage)
        _check_model_files(folder, stage, models, world)
        if stage <= 2:
            table = _zero2_table(reader, models[0], groups, paddings, world)
        else:
            table = _zero3_table(reader, models, groups, world)
        aliases = _add_shared(table, models[0].shared)
        source = FROM_OPTIMIZER
    else:
        world = models[0].world_size or len(models)
        _check_model_files(folder, stage, models, world)
        table, aliases = _module_table(reader, models[0], stage)
        source = FROM_MODULE
    note = f"DeepSpeed ZeRO-{stage}, {world} data-parallel rank(s), tag {folder.tag!r}: " + (
        "fp32 master weights from the optimizer files, as zero_to_fp32 consolidates them"
        if source == FROM_OPTIMIZER
        else "no *_optim_states.pt files, so the module weights saved in "
        f"{os.path.basename(models[0].file)} (as trained, not the fp32 master weights)"
    )
    metadata = {
        "zero_stage": str(stage),
        "world_size": str(world),
        "tag": folder.tag,
        "weights_from": source,
    }
    if models[0].ds_version:
        metadata["ds_version"] = models[0].ds_version
    return Checkpoint(
        path,
        f"deepspeed-zero{stage}",
        table,
        note=note,
        metadata=metadata,
        files=[*folder.model_files, *folder.optim_files],
        aliases=aliases,
    )


def _model_state(file: str) -> _ModelState:
    state = load_state(file)
    module = state.get("module")
    buffer_names = state.get("buffer_names")
    if not isinstance(module, Mapping) or not isinstance(buffer_names, list):
        raise InputError(f"{file}: not DeepSpeed model states (no module / buffer_names)")
    param_shapes = state.get("param_shapes") or []
    if not isinstance(param_shapes, list) or not all(isinstance(g, Mapping) for g in param_shapes):
        raise InputError(f"{file}: param_shapes is not a list of name -> shape mappings")
    shared = state.get("shared_params") or {}
    if not isinstance(shared, Mapping):
        raise InputError(f"{file}: shared_params is not a mapping")
    fragments = state.get("frozen_param_fragments") or {}
    if not isinstance(fragments, Mapping) or not all(
        isinstance(t, StoredTensor) for t in fragments.values()
    ):
        raise InputError(f"{file}: frozen_param_fragments is not a mapping of tensors")
    version = state.get("ds_version")
    return _ModelState(
        file=file,
        module=dict(module),
        buffer_names=[str(n) for n in buffer_names],
        param_shapes=[{str(k): _shape(file, k, v) for k, v in g.items()} for g in param_shapes],
        frozen_shapes={
            str(k): _shape(file, k, v) for k, v in (state.get("frozen_param_shapes") or {}).items()
        },
        frozen_fragments={str(k): v for k, v in fragments.items()},
        shared=[(str(k), str(v)) for k, v in shared.items()],
        world_size=as_int(state.get("dp_world_size")),
        ds_version=str(version) if version is not None else None,
    )


def _shape(file: str, name: Any, value: Any) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise InputError(f"{file}: the shape of {name!r} is not a tuple of sizes")
    return value


def _flat_groups(
    folder: ZeroFolder, stage: int
) -> tuple[int, list[list[StoredTensor]], list[list[int]] | None]:
    """Each rank's fp32 flat groups, the world size, and rank 0's alignment paddings
    (stages 1 and 2). Every rank's file must be there, agree on stage and world size, and
    hold one tensor per group."""
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    states = []
    for file in folder.optim_files:
        states.append(optimizer_state(file, load_state(file)))
    first = folder.optim_files[0]
    world = _world_size(first, states[0])
    expected = {rank_of(f): f for f in folder.optim_files}
    for rank in range(world):
        if rank not in expected:
            name = os.path.basename(first).replace("rank_0_", f"rank_{rank}_", 1)
            raise InputError(
                f"{os.path.join(folder.tag_dir, name)}: missing (rank {rank} of the "
                f"{world} that {os.path.basename(first)} gives as partition_count)"
            )
    if len(folder.optim_files) != world:
        raise InputError(
            f"{folder.tag_dir}: {len(folder.optim_files)} *_optim_states.pt files for a "
            f"world size of {world} (left over from another save?)"
        )
    groups: list[list[StoredTensor]] = []
    for file, state in zip(folder.optim_files, states, strict=True):
        if as_int(state.get("zero_stage")) != stage:
            raise InputError(f"{file}: ZeRO stage {as_int(state.get('zero_stage'))}, not {stage}")
        if _world_size(file, state) != world:
            raise InputError(
                f"{file}: partition_count gives world size {_world_size(file, state)}, "
                f"but {os.path.basename(first)} gives {world}"
            )
        flat = state.get(key)
        if not isinstance(flat, list) or not all(
            isinstance(t, StoredTensor) and t.is_contiguous for t in flat
        ):
            raise InputError(f"{file}: {key} is not a list of dense tensors")
        if groups and len(flat) != len(groups[0]):
            raise InputError(
                f"{file}: {len(flat)} param groups in {key}, {os.path.basename(first)} has "
                f"{len(groups[0])}"
            )
        groups.append(flat)
    paddings = states[0].get("param_alignment_paddings")
    if paddings is not None and not (
        isinstance(paddings, list)
        and all(isinstance(g, list) and all(as_int(p) is not None for p in g) for g in paddings)
    ):
        raise InputError(f"{first}: param_alignment_paddings is not a list of lists of ints")
    return world, groups, paddings


def _world_size(file: str, state: Mapping[str, Any]) -> int:
    """``partition_count``: an int, or (stages 1 and 2) one per param group, of which the
    largest is the data-parallel world size, as ``zero_to_fp32`` takes it."""
    count = state.get("partition_count")
    counts = count if isinstance(count, list) else [count]
    values = [as_int(c) for c in counts]
    if not values or any(v is None or v < 1 for v in values):
        raise InputError(f"{file}: partition_count {count!r} is not a world size")
    return max(v for v in values if v is not None)


def _check_model_files(
    folder: ZeroFolder, stage: int, models: list[_ModelState], world: int
) -> None:
    """Stage 3 has one model-states file per rank, agreeing on every shape; stages 1 and
    2 have one (``mp_rank_00_model_states.pt``)."""
    if stage <= 2:
        return
    ranks = {rank_of(m.file): m for m in models}
    for rank in range(world):
        if rank not in ranks:
            name = f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
            raise InputError(
                f"{os.path.join(folder.tag_dir, name)}: missing (rank {rank} of {world})"
            )
    if len(models) != world:
        raise InputError(
            f"{folder.tag_dir}: {len(models)} *_model_states.pt files for a world size of {world}"
        )
    first = models[0]
    for model in models[1:]:
        if model.param_shapes != first.param_shapes or model.frozen_shapes != first.frozen_shapes:
            raise InputError(
                f"{model.file}: its param shapes differ from {os.path.basename(first.file)}'s "
                "(files from different saves?)"
            )
        if model.world_size is not None and model.world_size != world:
            raise InputError(
                f"{model.file}: dp_world_size {model.world_size}, but the optimizer files "
                f"give {world}"
            )


def _buffers(reader: _Reader, model: _ModelState) -> Table:
    """The module's buffers, in module order, floating ones as fp32 (``zero_to_fp32``)."""
    names = set(model.buffer_names)
    table: Table = {}
    for name, value in model.module.items():
        if name in names:
            if not isinstance(value, StoredTensor):
                raise InputError(f"{model.file}: buffer {name!r} is not a tensor")
            table[name] = reader.stored(value, name, as_float=True)
    return table


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _zero2_table(
    reader: _Reader,
    model: _ModelState,
    groups: list[list[StoredTensor]],
    paddings: list[list[int]] | None,
    world: int,
) -> Table:
    table = _buffers(reader, model)
    for name in model.frozen_shapes:
        fragment = model.frozen_fragments.get(name)
        if fragment is None:
            raise InputError(f"{model.file}: frozen parameter {name!r} has no fragment")
        table[name] = reader.stored(fragment, name)
    if len(model.param_shapes) != len(groups[0]):
        raise InputError(
            f"{model.file}: {len(model.param_shapes)} groups of param_shapes, but the "
            f"optimizer files hold {len(groups[0])} flat groups"
        )
    if paddings is not None and len(paddings) != len(groups[0]):
        raise InputError(
            f"param_alignment_paddings has {len(paddings)} groups, not {len(groups[0])}"
        )
    align = 2 * world
    for g, shapes in enumerate(model.param_shapes):
        parts = [rank_groups[g] for rank_groups in groups]  # the group, rank after rank
        avail = sum(p.numel for p in parts)
        group_paddings = paddings[g] if paddings is not None else None
        if group_paddings is not None and len(group_paddings) != len(shapes):
            raise InputError(
                f"group {g}: {len(group_paddings)} alignment paddings for {len(shapes)} params"
            )
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = _numel(shape)
            if offset + numel > avail:
                raise _short(parts, g, offset + numel, avail)
            table[name] = reader.ref(_pieces(parts, offset, numel), shape, name)
            offset += numel
            if group_paddings is not None:
                offset += as_int(group_paddings[i]) or 0
        # Groups end padded to 2 * world_size elements (for NCCL), so only the aligned
        # totals must agree, as zero_to_fp32 checks.
        if math.ceil(offset / align) != math.ceil(avail / align):
            raise InputError(
                f"{parts[0].path}: param group {g}: the shapes use {offset} of the "
                f"{avail} elements in the ranks' fp32 groups (shapes from another save?)"
            )
    return table


def _short(parts: list[StoredTensor], group: int, needed: int, avail: int) -> InputError:
    return InputError(
        f"{parts[0].path}: fp32 group {group} of the ranks holds {avail} elements, the "
        f"param shapes need {needed} (truncated or from another save?)"
    )


def _pieces(parts: Sequence[StoredTensor], offset: int, length: int) -> list[_Piece]:
    """Elements ``offset`` to ``offset + length`` of ``parts`` joined end to end."""
    pieces: list[_Piece] = []
    start = 0
    for part in parts:
        end = start + part.numel
        lo, hi = max(offset, start), min(offset + length, end)
        if lo < hi:
            pieces.append(_Piece(part, lo - start, hi - lo))
        start = end
    return pieces


def _zero3_table(
    reader: _Reader,
    models: list[_ModelState],
    groups: list[list[StoredTensor]],
    world: int,
) -> Table:
    table = _buffers(reader, models[0])
    for name, shape in models[0].frozen_shapes.items():
        numel = _numel(shape)
        fragments = []
        for model in models:
            fragment = model.frozen_fragments.get(name)
            if fragment is None or not fragment.is_contiguous:
                raise InputError(f"{model.file}: frozen parameter {name!r} has no dense fragment")
            fragments.append(fragment)
        if sum(f.numel for f in fragments) < numel:
            raise InputError(
                f"{models[0].file}: the ranks' fragments of frozen {name!r} hold "
                f"{sum(f.numel for f in fragments)} elements, its shape needs {numel}"
            )
        table[name] = reader.ref(_pieces(fragments, 0, numel), shape, name)
    sizes = [t.numel for t in groups[0]]
    for rank, rank_groups in enumerate(groups[1:], 1):
        if [t.numel for t in rank_groups] != sizes:
            raise InputError(
                f"{rank_groups[0].path}: fp32_flat_groups of {[t.numel for t in rank_groups]} "
                f"elements, rank 0 has {sizes} (rank {rank} from another save?)"
            )
    per_rank = sum(sizes)
    offset = 0
    shapes = {name: shape for g in models[0].param_shapes for name, shape in g.items()}
    for name, shape in shapes.items():
        numel = _numel(shape)
        part = math.ceil(numel / world)  # each rank's share, the last one's padded
        if offset + part > per_rank:
            raise _short(groups[0], 0, (offset + part) * world, per_rank * world)
        pieces = []
        for rank_groups in groups:
            pieces.extend(_pieces(rank_groups, offset, part))
        table[name] = reader.ref(_trim(pieces, numel), shape, name)
        offset += part
    if offset != per_rank:
        raise InputError(
            f"{groups[0][0].path}: the param shapes use {offset * world} of the "
            f"{per_rank * world} elements in the ranks' fp32_flat_groups (shapes from another save?)"
        )
    return table


def _trim(pieces: list[_Piece], length: int) -> list[_Piece]:
    """The first ``length`` elements of ``pieces`` (dropping stage 3's end padding)."""
    kept: list[_Piece] = []
    for piece in pieces:
        if length <= 0:
            break
        take = min(piece.length, length)
        kept.append(_Piece(piece.tensor, piece.start, take))
        length -= take
    return kept


def _add_shared(table: Table, shared: list[tuple[str, str]]) -> dict[str, str]:
    """Tied names get the tensor they are tied to (where that one is in the table)."""
    aliases: dict[str, str] = {}
    for name, other in shared:
        if other in table:
            table[name] = table[other]
            aliases[name] = other
    return aliases


def _module_table(reader: _Reader, model: _ModelState, stage: int) -> tuple[Table, dict[str, str]]:
    """The ``module`` state dict saved beside the ZeRO state, tensors as stored."""
    expected = {n: s for g in model.param_shapes for n, s in g.items()} | model.frozen_shapes
    table: Table = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[str, int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, value in model.module.items():
        if not isinstance(value, StoredTensor):
            continue
        want = expected.get(name)
        if want is not None and value.shape != want:
            raise InputError(
                f"{model.file}: module weight {name!r} is {value.shape}, not {want}: "
                + (
                    "ZeRO-3 saves its parameters partitioned; the *_optim_states.pt files "
                    "are needed to consolidate them"
                    if stage == 3
                    else "the model states are inconsistent"
                )
            )
        table[name] = reader.stored(value, name)
        ident = (value.path, value.offset, value.storage_offset, value.shape, value.stride)
        if value.numel and ident in seen:
            aliases[name] = seen[ident]
        else:
            seen[ident] = name
    if not table:
        raise InputError(f"{model.file}: no module weights")
    return table, aliases
