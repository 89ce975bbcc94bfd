"""Save real DeepSpeed ZeRO checkpoints; run with ``torchrun --nproc-per-node 2`` (gloo, CPU).

Used by tests/test_zero.py and benchmarks/bench_zero.py::

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 tests/zero_save.py OUT --stages 1 2 3

writes ``OUT/zero{stage}/`` (a folder with ``latest`` and ``global_step2/``) for each stage:
a small model with a frozen layer, a tied weight and two buffers (one integer), trained two
Adam steps so the fp32 master weights differ from the initial ones. ``--width W`` builds a
wider model of that shape instead (the benchmark's ~1 GiB one);
"""

from __future__ import annotations

import argparse
import itertools
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch
from torch import nn


class Net(nn.Module):
    """Embedding tied to the output head, a frozen layer, odd sizes (so partitions pad)."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(37, width)
        self.frozen = nn.Linear(width, width)
        self.frozen.requires_grad_(False)
        sizes = [width, *([width + 3] * layers)]  # width + 3: sizes that do not divide evenly
        self.body = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.norm = nn.LayerNorm(sizes[-1])
        self.proj = nn.Linear(sizes[-1], width, bias=False)
        self.head = nn.Linear(width, 37, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("position", torch.arange(5))
        self.register_buffer("scale", torch.full((3,), 0.5))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.frozen(self.embed(tokens)) * self.scale.mean()
        for layer in self.body:
            x = torch.relu(layer(x))
        return self.head(self.proj(self.norm(x)))


def save(out: str, stage: int, bf16: bool, width: int, layers: int, steps: int) -> str:
    """Train and save one checkpoint; the folder's name."""
    torch.manual_seed(0)
    model = Net(width, layers)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1000,
        "bf16": {"enabled": bf16},
    }
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=config,
    )
    generator = torch.Generator().manual_seed(1 + engine.global_rank)
    for _ in range(steps):
        tokens = torch.randint(0, 37, (2, 4), generator=generator)
        loss = engine(tokens).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    name = f"zero{stage}_bf16" if bf16 else f"zero{stage}"
    engine.save_checkpoint(os.path.join(out, name), tag=f"global_step{steps}")
    engine.destroy()
    return name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--width", type=int, default=6)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--bf16-stages", type=int, nargs="*", default=[])
    parser.add_argument("--reference", action="store_true")
    args = parser.parse_args()
    runs = [(s, False) for s in args.stages] + [(s, True) for s in args.bf16_stages]
    names = [save(args.out, s, bf16, args.width, args.layers, args.steps) for s, bf16 in runs]
    if args.reference and torch.distributed.get_rank() == 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        for name in names:
            folder = os.path.join(args.out, name)
            state = get_fp32_state_dict_from_zero_checkpoint(folder)
            torch.save(state, os.path.join(args.out, f"{name}.reference.pt"))


if __name__ == "__main__":
    main()
