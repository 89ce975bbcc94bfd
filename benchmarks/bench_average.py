"""Averaging benchmark: ``average`` of 5 checkpoints against ``cp`` of each of them.

Generates five safetensors checkpoints of ``--size`` GiB each (default 1; big square f32
matrices plus small norms, different values in each), then measures, on a warm page cache,
the median of ``--repeat`` rounds of:

* ``cp`` of each of the five inputs (reads every input byte once, as the average must;
  writes five times what the average writes);
* CLI start-up: ``ckptsurgeon apply`` on a tiny checkpoint;
* ``apply --no-fsync`` of ``{op: average, from: [s1, s2, s3, s4]}`` (the source is the
  fifth input), against ``cp`` x 5;
* ``apply`` (durable, the default) against ``cp`` x 5 followed by ``sync``.

Peak RSS is each child's ``ru_maxrss``; the target is memory flat in the number and size
of inputs: RSS above start-up under 256 MiB (each tensor is averaged alone, in float64).

    python benchmarks/bench_average.py                 # 5 x 1 GiB
    python benchmarks/bench_average.py --size 0.05     # a quick smoke run
    python benchmarks/bench_average.py --verify-only   # correctness only (tests run this)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import timed  # a sibling module: the benchmarks run as scripts

GiB = 1 << 30
MiB = 1 << 20
CLI = [sys.executable, "-m", "ckptsurgeon"]
INPUTS = 5
SETTLE_S = 1.0


def make_inputs(folder: Path, total_bytes: int) -> list[Path]:
    """``INPUTS`` checkpoints of one layout, each about ``total_bytes``, values differing."""
    import torch
    from safetensors.torch import save_file

    side = 2048 if total_bytes >= GiB // 4 else 256
    per_matrix = side * side * 4
    count = max(1, total_bytes // per_matrix)
    paths = []
    for k in range(INPUTS):
        gen = torch.Generator().manual_seed(k)
        state = {}
        for i in range(count):
            state[f"layers.{i // 4}.proj{i % 4}.weight"] = torch.randn(side, side, generator=gen)
            if i % 4 == 3:
                state[f"layers.{i // 4}.norm.weight"] = torch.rand(side, generator=gen)
        state["layers.0.steps"] = torch.tensor(k, dtype=torch.int64)
        path = folder / f"in{k}.safetensors"
        save_file(state, path)
        paths.append(path)
        del state
    return paths


def rules_file(folder: Path, inputs: list[Path]) -> Path:
    sources = "".join(f"  s{k}: {p}\n" for k, p in enumerate(inputs[1:], 1))
    names = ", ".join(f"s{k}" for k in range(1, len(inputs)))
    path = folder / "average.yaml"
    path.write_text(
        f"version: 1\nsource: {inputs[0]}\nsources:\n{sources}"
        f"rules:\n  - {{op: average, from: [{names}]}}\n"
    )
    return path


def settle(*outs: Path) -> None:
    """Remove the last outputs and let the disk go quiet before the next run."""
    for out in outs:
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
    os.sync()
    time.sleep(SETTLE_S)


def verify(work: Path) -> None:
    """The output is the float64 mean of the five, cast back; the integer from the first."""
    import torch
    from safetensors.torch import load_file

    inputs = make_inputs(work, 4 * MiB)
    out = work / "verify_out.safetensors"
    subprocess.run(
        [*CLI, "apply", str(rules_file(work, inputs)), "--output", str(out), "-q"], check=True
    )
    got = load_file(out)
    states = [load_file(p) for p in inputs]
    assert sorted(got) == sorted(states[0]), "wrong keys"
    for name, first in states[0].items():
        if first.is_floating_point():
            acc = first.to(torch.float64, copy=True)
            for other in states[1:]:
                acc += other[name].to(torch.float64)
            expected = (acc / len(states)).to(first.dtype)
        else:
            expected = first
        assert got[name].dtype == expected.dtype and torch.equal(got[name], expected), name
    for p in [*inputs, out]:
        p.unlink()
    print("verified: the average is the float64 mean of all five inputs")


def bench(size_gib: float, work: Path, repeat: int) -> dict[str, float]:
    inputs = make_inputs(work, int(size_gib * GiB))
    data = sum(p.stat().st_size for p in inputs)
    rules = rules_file(work, inputs)
    out = work / "averaged.safetensors"
    copies = [work / f"copy{k}.safetensors" for k in range(INPUTS)]
    report = work / "report.json"
    tiny = work / "tiny.safetensors"
    if not tiny.exists():
        import torch
        from safetensors.torch import save_file

        save_file({"a": torch.ones(4)}, tiny)
        (work / "tiny.yaml").write_text("version: 1\nrules:\n  - {op: cast, dtype: float16}\n")
    cp = " && ".join(f"cp '{src}' '{dst}'" for src, dst in zip(inputs, copies, strict=True))
    apply = [*CLI, "apply", str(rules), "--output", str(out), "-q", "--report", str(report)]
    startup = [*CLI, "apply", str(work / "tiny.yaml"), "--source", str(tiny),
               "--output", str(work / "tiny_out.safetensors"), "-q"]  # fmt: skip
    contenders = {
        "startup": startup,
        "cp": ["sh", "-c", cp],
        "average": [*apply, "--no-fsync"],
        "cp_sync": ["sh", "-c", f"{cp} && sync"],
        "durable": apply,
    }
    subprocess.run(["sh", "-c", cp], check=True)  # warm the page cache with the inputs
    walls: dict[str, list[float]] = {k: [] for k in contenders}
    works: dict[str, list[float]] = {k: [] for k in contenders}
    rss = dict.fromkeys(contenders, 0)
    for _ in range(repeat):
        for name, cmd in contenders.items():
            settle(out, *copies)
            wall, peak = timed(cmd)
            walls[name].append(wall)
            rss[name] = max(rss[name], peak)
            if "--report" in cmd:
                seconds = json.loads(report.read_text())["seconds"]
                works[name].append(seconds["plan"] + seconds["write"])
    settle(out, *copies)
    for p in inputs:
        p.unlink()
    print(f"{size_gib} GiB x {INPUTS}, seconds per round: "
          f"{ {k: [round(x, 2) for x in v] for k, v in walls.items()} }", flush=True)  # fmt: skip
    med = {k: statistics.median(v) for k, v in walls.items()}
    return {
        "size_gib": size_gib,
        "bytes": data,
        **{f"{k}_s": v for k, v in med.items()},
        **{f"{k}_work": statistics.median(v) for k, v in works.items() if v},
        **{f"{k}_rss": v for k, v in rss.items()},
    }


def report(r: dict[str, float]) -> bool:
    above = {k: (r[f"{k}_rss"] - r["startup_rss"]) / MiB for k in ("average", "durable")}
    print(f"\n| inputs | cp x {INPUTS} | average --no-fsync: work / wall | ratio (wall - start-up) "
          f"| cp x {INPUTS} && sync | average (durable): work / wall | ratio "
          "| RSS above start-up |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {INPUTS} x {r['bytes'] / INPUTS / GiB:.2f} GiB | {r['cp_s']:.2f} s "
        f"| {r['average_work']:.2f} s / {r['average_s']:.2f} s "
        f"| {(r['average_s'] - r['startup_s']) / r['cp_s']:.2f}x "
        f"| {r['cp_sync_s']:.2f} s | {r['durable_work']:.2f} s / {r['durable_s']:.2f} s "
        f"| {(r['durable_s'] - r['startup_s']) / r['cp_sync_s']:.2f}x "
        f"| {above['average']:.0f} / {above['durable']:.0f} MiB |"
    )
    print(f"\nCLI start-up: {r['startup_s']:.2f} s, {r['startup_rss'] / MiB:.0f} MiB RSS")
    ok = max(above.values()) <= 256
    print("target met (RSS above start-up <= 256 MiB)" if ok else "TARGET MISSED")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=1.0, help="GiB per input")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--verify-only", action="store_true", help="only check the output")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckptsurgeon-bench-avg-", dir=args.workdir))
    try:
        verify(work)
        if args.verify_only:
            return
        ok = report(bench(args.size, work, args.repeat))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
