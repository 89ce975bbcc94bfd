"""bf16 training throughput and peak memory: frozen backbone vs full fine-tuning (resnet50).

Runs the runner's own pieces (freeze, BatchNorm lock, per-phase param groups, training
epoch) on synthetic 224x224 images already on the device, so the numbers measure training,
not data loading. Prints one table; the issue expects frozen peak memory <= 60% of full.

    python benchmarks/gpu_bench.py                 # CUDA
    python benchmarks/gpu_bench.py --device cpu --size 64 --steps 2 --arch resnet18   # smoke
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from ckptsurgeon.finetune.freeze import backbone_names, set_frozen
from ckptsurgeon.finetune.runner import (
    Runtime,
    make_optimizer,
    make_schedule,
    param_groups,
    run_epoch,
)
from ckptsurgeon.rules.finetune import FinetuneSpec, FreezeSpec, PhaseSpec


def measure(
    arch: str, frozen: bool, device: torch.device, size: int, batch: int, steps: int
) -> tuple[float, float]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=100).to(device)
    freeze = FreezeSpec(first_children=len(list(model.children())) - 1)
    backbone = backbone_names(model, freeze)
    set_frozen(model, backbone, frozen=frozen, train_bn=False)
    phase = PhaseSpec(epochs=1, frozen=frozen, lr=0.01, backbone_lr_scale=0.1)
    spec = FinetuneSpec.model_validate(
        {
            "data": {"train": {"tensors": "unused"}},
            "freeze": {"first_children": 1},
            "phases": [phase.model_dump()],
        }
    )
    optimizer = make_optimizer(spec, param_groups(model, backbone, phase, 0.0, False))
    x = torch.randn(batch * steps, 3, size, size, device=device)
    y = torch.randint(0, 100, (batch * steps,), device=device)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    rt = Runtime(device, torch.bfloat16 if device.type == "cuda" else None)
    schedule = make_schedule(optimizer, phase, len(loader))
    run_epoch(
        model,
        DataLoader(TensorDataset(x[:batch], y[:batch]), batch_size=batch),
        rt,
        optimizer,
        schedule,
        None,
        None,
    )  # warm-up (cuDNN autotune, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    run_epoch(model, loader, rt, optimizer, schedule, None, None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    )
    return batch * steps / seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = {
        mode: measure(args.arch, mode == "frozen", device, args.size, args.batch, args.steps)
        for mode in ("full", "frozen")
    }
    (full_ips, full_mem), (frozen_ips, frozen_mem) = rows["full"], rows["frozen"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"{args.arch}, batch {args.batch}, {args.size}x{args.size}, {precision} on {name}")
    print("| mode | images/s | peak memory (MiB) |")
    print("|---|---|---|")
    print(f"| full fine-tuning | {full_ips:.0f} | {full_mem:.0f} |")
    print(f"| frozen backbone | {frozen_ips:.0f} | {frozen_mem:.0f} |")
    print(
        f"\nfrozen/full: {frozen_ips / full_ips:.2f}x throughput, "
        f"{frozen_mem / full_mem:.0%} of the peak memory"
    )


if __name__ == "__main__":
    main()
