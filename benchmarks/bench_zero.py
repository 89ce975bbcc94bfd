"""ZeRO-3 consolidation benchmark: ``ckptsurgeon convert`` beside DeepSpeed's ``zero_to_fp32``.

Saves, with DeepSpeed itself (two ranks under torchrun, gloo on the CPU: tests/zero_save.py),
a ZeRO-3 checkpoint of about ``--size`` GiB of fp32 weights, and a second one at a quarter
of that size (memory must be flat in the checkpoint's size). Then, on a warm page cache, in
one run, the median of ``--rounds`` rounds of:

* CLI start-up: ``ckptsurgeon convert`` of a tiny safetensors file;
* ``python -m deepspeed.utils.zero_to_fp32 ZERO_DIR OUT``: DeepSpeed's own consolidation,
  as its docs say to run it (imports deepspeed), writing ``pytorch_model.bin`` (its
  ``--safe_serialization`` refuses a model with tied weights, as this one has);
* ``ckptsurgeon convert ZERO_DIR OUT.safetensors --no-fsync`` (zero_to_fp32 does not fsync
  either), which never imports deepspeed.

Peak RSS is each child's ``ru_maxrss``; "above start-up" subtracts the tiny convert's. The
outputs are compared tensor by tensor (they must be equal, bit for bit). Targets: at most
zero_to_fp32's time, and RSS above start-up under 256 MiB and flat in the size.

    python benchmarks/bench_zero.py                  # about 1 GiB (and 0.25 GiB)
    python benchmarks/bench_zero.py --size 0.05      # a quick smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from measure import spread, timed  # a sibling module: the benchmarks run as scripts

GiB = 1 << 30
MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "ckptsurgeon"]
ZERO_TO_FP32 = [sys.executable, "-m", "deepspeed.utils.zero_to_fp32"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
TAG = "global_step1"


def model_shape(size_gib: float) -> tuple[int, int]:
    """zero_save's ``--width`` and ``--layers`` for about ``size_gib`` GiB of fp32 weights:
    hidden layers of (width + 3)^2, plus the frozen layer and the projection."""
    width = 2045 if size_gib >= 0.1 else 253  # 2048-wide layers: 16 MiB each
    per_layer = (width + 3) ** 2 * 4
    return width, max(1, round(size_gib * GiB / per_layer) - 2)


def save_zero3(folder: Path, size_gib: float) -> Path:
    """A ZeRO-3 checkpoint of about ``size_gib`` GiB of fp32 weights, saved by two ranks."""
    width, layers = model_shape(size_gib)
    proc = subprocess.run(
        [*TORCHRUN, str(REPO / "tests" / "zero_save.py"), str(folder), "--stages", "3",
         "--width", str(width), "--layers", str(layers), "--steps", "1"],
        capture_output=True, text=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"DeepSpeed could not save {size_gib} GiB here:\n{proc.stderr[-3000:]}")
    return folder / "zero3"


def weight_bytes(zero: Path) -> int:
    """Bytes of the fp32 master weights: what the consolidated output holds."""
    return sum(p.stat().st_size for p in (zero / TAG).glob("*optim_states.pt")) // 3


def warm(zero: Path) -> None:
    """Read every file once, so every contender starts from the same page cache."""
    for path in zero.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(64 * MiB):
                    pass


def same_outputs(ours: Path, theirs: Path) -> int:
    """The number of tensors; raises unless both outputs hold equal tensors."""
    import torch
    from safetensors.torch import load_file

    a = load_file(ours)
    b = {}
    for shard in sorted(theirs.glob("pytorch_model*.bin")):
        b.update(torch.load(shard, weights_only=True))
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for name, tensor in a.items():
        assert tensor.dtype == b[name].dtype and torch.equal(tensor, b[name]), name
    return len(a)


def clear(out: Path) -> None:
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()


def bench(zero: Path, work: Path, rounds: int) -> dict[str, Any]:
    """Each contender's median wall time and peak RSS; the last outputs are compared."""
    tiny = work / "tiny.safetensors"
    if not tiny.exists():
        import torch
        from safetensors.torch import save_file

        save_file({"a": torch.ones(4)}, tiny)
    outs = {
        "startup": work / "tiny_out.safetensors",
        "zero_to_fp32": work / "theirs",
        "ckptsurgeon": work / "ours.safetensors",
    }
    contenders = {
        "startup": [*CLI, "convert", str(tiny), str(outs["startup"]), "-q", "--no-fsync"],
        "zero_to_fp32": [*ZERO_TO_FP32, str(zero), str(outs["zero_to_fp32"])],
        "ckptsurgeon": [*CLI, "convert", str(zero), str(outs["ckptsurgeon"]), "-q",
                        "--no-fsync"],
    }  # fmt: skip
    warm(zero)
    walls: dict[str, list[float]] = {k: [] for k in contenders}
    rss = dict.fromkeys(contenders, 0)
    for _ in range(rounds):
        for name, cmd in contenders.items():
            clear(outs[name])
            time.sleep(0.5)  # let the last writer's dirty pages drain a little
            wall, peak = timed(cmd)
            walls[name].append(wall)
            rss[name] = max(rss[name], peak)
    tensors = same_outputs(outs["ckptsurgeon"], outs["zero_to_fp32"])
    for out in outs.values():
        clear(out)
    rounded = {k: [round(x, 2) for x in v] for k, v in walls.items()}
    peaks = {k: round(v / MiB) for k, v in rss.items()}
    print(f"{weight_bytes(zero) / GiB:.2f} GiB: seconds per round {rounded}; peak RSS MiB "
          f"{peaks}; {tensors} tensors equal bit for bit", flush=True)  # fmt: skip
    return {
        "bytes": weight_bytes(zero),
        **{f"{k}_s": statistics.median(v) for k, v in walls.items()},
        **{f"{k}_rss": v for k, v in rss.items()},
        # Paired per round: both ran back to back, so the machine's mood cancels out.
        "ratios": [a / b for a, b in zip(walls["ckptsurgeon"], walls["zero_to_fp32"], strict=True)],
    }


def report(rows: list[dict[str, Any]]) -> bool:
    print("\n| fp32 weights | zero_to_fp32 (median) | ckptsurgeon convert (median) "
          "| time ratio, paired per round "
          "| zero_to_fp32 peak RSS | ckptsurgeon RSS above start-up |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    ok = True
    for r in rows:
        above = (r["ckptsurgeon_rss"] - r["startup_rss"]) / MiB
        ratio = statistics.median(r["ratios"])
        print(
            f"| {r['bytes'] / GiB:.2f} GiB | {r['zero_to_fp32_s']:.2f} s "
            f"| {r['ckptsurgeon_s']:.2f} s | {spread(r['ratios'])} "
            f"| {r['zero_to_fp32_rss'] / MiB:.0f} MiB | {above:.0f} MiB |"
        )
        ok = ok and ratio <= 1.0 and above <= 256
    start = rows[-1]
    print(f"\nCLI start-up: {start['startup_s']:.2f} s, {start['startup_rss'] / MiB:.0f} MiB RSS")
    print("targets met (time <= zero_to_fp32, RSS above start-up <= 256 MiB)" if ok
          else "TARGET MISSED")  # fmt: skip
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=1.0, help="GiB of fp32 weights")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckptsurgeon-bench-zero-", dir=args.workdir))
    try:
        rows = []
        for size in (args.size / 4, args.size):
            folder = work / f"size{size:g}"
            zero = save_zero3(folder, size)
            rows.append(bench(zero, work, args.rounds))
            shutil.rmtree(folder)
        ok = report(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
