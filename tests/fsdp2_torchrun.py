"""Run with ``torchrun --nproc-per-node 2`` (gloo, CPU) by tests/test_fsdp2.py.

``save OUT``: two FSDP2 (``fully_shard``) models take one optimizer step each, then save
their sharded state dicts with ``dcp.save`` (every rank writes its own shards), and rank 0
saves the gathered full state dict beside each as the reference (``full.pt``):

* ``OUT/plain``: a small MLP, every layer sharded;
* ``OUT/mixed``: the same with a frozen first block and a bf16 ``MixedPrecisionPolicy``
  (parameters kept in fp32, computed in bf16).

``load DCP REF KIND``: an FSDP2 model (KIND ``plain`` or ``mixed``) loads the DCP folder
``DCP`` with ``dcp.load``, resharded onto this world, and every rank checks its own shards
against the matching slices of ``REF`` (a torch file). Exits non-zero naming the first
mismatch.

``convert SRC OUT``: ``ckptsurgeon.api.convert(SRC, OUT, format="dcp")`` inside this
program's process group: rank 0 writes, the other rank waits, both get what was written.

Several commands run in one launch, separated by ``+``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

# Sizes chosen so dim 0 does not split evenly over two ranks (FSDP2 pads the last shard).
SIZES = [(12, 7), (7, 5), (5, 3)]


def build(mixed: bool) -> nn.Module:
    """The MLP, seeded identically on every rank, sharded layer by layer, then the root."""
    torch.manual_seed(0)
    layers = [nn.Linear(i, o) for i, o in SIZES]
    model = nn.Sequential(
        nn.Sequential(layers[0], nn.ReLU()),
        nn.Sequential(layers[1], nn.ReLU()),
        nn.Sequential(layers[2], nn.LayerNorm(3)),
    )
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": policy} if mixed else {}
    if mixed:
        model[0].requires_grad_(False)  # the frozen part
    for block in model:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def save(out: str) -> None:
    for mixed in (False, True):
        folder = os.path.join(out, "mixed" if mixed else "plain")
        model = build(mixed)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=0.1)
        torch.manual_seed(1 + dist.get_rank())  # each rank its own batch
        model(torch.randn(4, SIZES[0][0])).float().square().mean().backward()
        optimizer.step()
        dcp.save(get_model_state_dict(model), checkpoint_id=os.path.join(folder, "dcp"))
        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if dist.get_rank() == 0:
            torch.save({k: v.clone() for k, v in full.items()}, os.path.join(folder, "full.pt"))
        dist.barrier()


def load(source: str, reference: str, mixed: bool) -> None:
    ref = torch.load(reference, weights_only=True)
    model = build(mixed)
    state = get_model_state_dict(model)
    if sorted(state) != sorted(ref):
        raise SystemExit(f"names differ: {sorted(set(state) ^ set(ref))}")
    with torch.no_grad():
        for value in state.values():
            value.zero_() if not isinstance(value, DTensor) else value.to_local().zero_()
    dcp.load(state, checkpoint_id=source)
    rank, world = dist.get_rank(), dist.get_world_size()
    checked = 0
    for name, value in state.items():
        expected = ref[name]
        if isinstance(value, DTensor):
            local = value.to_local()
            parts = list(expected.chunk(world, dim=0))  # FSDP2's Shard(0): torch.chunk
            expected = parts[rank] if rank < len(parts) else expected[:0]
        else:
            local = value
        if local.dtype != expected.dtype or not torch.equal(local, expected):
            raise SystemExit(f"rank {rank}: {name} differs from the reference")
        checked += local.numel()
    print(f"rank {rank}: {len(state)} tensors, {checked} elements match", flush=True)


def convert(source: str, out: str) -> None:
    from ckptsurgeon.api import convert as convert_api

    result = convert_api(source, out, format="dcp", max_shard_size="200B")
    print(f"rank {dist.get_rank()}: rank 0 wrote {len(result.files)} files to {result.path}")


def main() -> None:
    commands = {"save": save, "load": load, "convert": convert}
    dist.init_process_group("gloo")
    try:
        args = sys.argv[1:]
        while args:
            end = args.index("+") if "+" in args else len(args)
            name, *rest = args[:end]
            if name == "load":
                load(rest[0], rest[1], rest[2] == "mixed")
            else:
                commands[name](*rest)
            args = args[end + 1 :]
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
