"""Streaming surgery benchmark: apply vs `cp -r` vs the naive load-all/save-all recipe.

Generates Hugging Face-layout sharded safetensors checkpoints (1 GiB and 4 GiB by default,
5 shards each), then measures side by side, in one run, on a warm page cache (emptied of
everything else first, when run as root; see ``drop_caches``). Each round runs every
contender once, after the previous output is removed and the disk has settled; the tables
give the median of the rounds:

* ``cp -r`` of the folder (the floor: what copying the bytes costs);
* CLI start-up: ``ckptsurgeon apply`` on a tiny checkpoint (imports, model-free plan);
* ``apply --no-fsync`` renaming every key into a sharded folder (like ``cp -r``, it does not
  wait for the disk);
* ``apply --no-fsync`` casting everything to bfloat16 into a sharded folder;
* ``apply`` (durable, the default) renaming, against ``cp -r && sync``;
* the naive recipe: ``safetensors.torch.load_file`` every shard, rename, ``save_torch_state_dict``.

Peak RSS is each child process's ``ru_maxrss``. Targets (issue "Streaming at scale"):
rename <= 1.5x cp, cast <= 2x cp (both after subtracting start-up), RSS above start-up
<= 256 MiB and flat (4 GiB within 1.25x of 1 GiB).

    python benchmarks/bench_streaming.py                  # 1 GiB and 4 GiB
    python benchmarks/bench_streaming.py --sizes 0.05     # a quick smoke run (CI uses this)
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
import textwrap
import time
from pathlib import Path

from measure import timed  # a sibling module: the benchmarks run as scripts

GiB = 1 << 30
CLI = [sys.executable, "-m", "ckptsurgeon"]
SETTLE_S = 1.0

NAIVE = textwrap.dedent("""
    import sys, glob, os
    from safetensors.torch import load_file
    from huggingface_hub import save_torch_state_dict
    src, dst = sys.argv[1], sys.argv[2]
    state = {}
    for shard in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        state.update(load_file(shard))
    state = {"model." + k: v for k, v in state.items()}
    os.makedirs(dst)
    save_torch_state_dict(state, dst, max_shard_size=int(sys.argv[3]))
""")


def make_checkpoint(folder: Path, total_bytes: int, shards: int = 5) -> int:
    """A Llama-like layout: big square f32 matrices plus small norms; returns the shard size."""
    import torch
    from huggingface_hub import save_torch_state_dict

    side = 2048 if total_bytes >= GiB else 512
    per_matrix = side * side * 4
    state = {}
    i = 0
    while sum(t.nbytes for t in state.values()) + per_matrix <= total_bytes:
        state[f"layers.{i // 4}.proj{i % 4}.weight"] = torch.full((side, side), float(i))
        if i % 4 == 3:
            state[f"layers.{i // 4}.norm.weight"] = torch.ones(side)
        i += 1
    size = sum(t.nbytes for t in state.values())
    max_shard = size // shards + per_matrix
    folder.mkdir(parents=True)
    save_torch_state_dict(state, folder, max_shard_size=max_shard)
    return max_shard


def settle(out: Path) -> None:
    """Remove the last output and let the disk go quiet, so no run pays for the write-back
    (and, on ``discard`` mounts, the trims) of the one before."""
    if out.exists():
        shutil.rmtree(out)
    os.sync()
    time.sleep(SETTLE_S)


def drop_caches() -> bool:
    """Empty the page cache (root only), so each size starts from the same memory state.

    With the cache full of other files, every page written must first be reclaimed, and
    kswapd then competes for the cores: a two-thread writer suffers more than one-thread
    ``cp`` (measured here: rename/cp ~1.9x with 1.4 GiB free, ~1.0x with the cache empty).
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def rules_file(folder: Path, name: str, body: str, shard: int) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"version: 1\noutput: {{max_shard_size: {shard}}}\nrules:\n{body}")
    return path


def bench(size_gib: float, work: Path, repeat: int) -> dict[str, float]:
    """Every contender once per round, rounds repeated, medians kept (drift hits all alike)."""
    dropped = drop_caches()
    print(f"{size_gib} GiB: page cache {'emptied' if dropped else 'left as it is (not root)'}")
    src = work / f"src_{size_gib}g"
    shard = make_checkpoint(src, int(size_gib * GiB))
    out = work / "out"
    data_bytes = sum(p.stat().st_size for p in src.iterdir())

    tiny = work / "tiny.safetensors"
    if not tiny.exists():
        import torch
        from safetensors.torch import save_file

        save_file({"a": torch.ones(4)}, tiny)
        (work / "tiny.yaml").write_text(
            "version: 1\nrules:\n  - {op: rename, pattern: '^', replace: 'model.'}\n"
        )
    rename = rules_file(
        work, "rename", "  - {op: rename, pattern: '^', replace: 'model.'}\n", shard
    )
    cast = rules_file(work, "cast", "  - {op: cast, dtype: bfloat16}\n", shard)
    report = work / "report.json"

    def apply(rules: Path, *flags: str) -> list[str]:
        return [*CLI, "apply", str(rules), "--source", str(src), "--output", str(out),
                "--quiet", "--report", str(report), *flags]  # fmt: skip

    startup = [*CLI, "apply", str(work / "tiny.yaml"), "--source", str(tiny),
               "--output", str(work / "tiny_out.safetensors"), "--quiet"]  # fmt: skip
    # Like cp -r, --no-fsync does not wait for the disk; the default (durable) is compared
    # with cp -r followed by sync.
    contenders = {
        "cp": ["cp", "-r", str(src), str(out)],
        "startup": startup,
        "rename": apply(rename, "--no-fsync"),
        "cast": apply(cast, "--no-fsync"),
        "durable": apply(rename),
        "cp_sync": ["sh", "-c", f"cp -r '{src}' '{out}' && sync"],
    }
    subprocess.run(["cp", "-r", str(src), str(out)], check=True)  # warm the page cache
    subprocess.run(startup, check=True)  # and the interpreter's files
    walls: dict[str, list[float]] = {k: [] for k in contenders}
    works: dict[str, list[float]] = {k: [] for k in contenders}
    rss: dict[str, int] = dict.fromkeys(contenders, 0)
    for _ in range(repeat):
        for name, cmd in contenders.items():
            settle(out)
            wall, peak = timed(cmd)
            walls[name].append(wall)
            rss[name] = max(rss[name], peak)
            if "--report" in cmd:
                seconds = json.loads(report.read_text())["seconds"]
                works[name].append(seconds["plan"] + seconds["write"])
    settle(out)
    naive_wall, naive_rss = timed([sys.executable, "-c", NAIVE, str(src), str(out), str(shard)])
    settle(out)
    shutil.rmtree(src)
    rounds = {k: [round(x, 2) for x in v] for k, v in walls.items()}
    rounds.update({f"{k} work": [round(x, 2) for x in v] for k, v in works.items() if v})
    print(f"{size_gib} GiB, seconds per round: {rounds}", flush=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    return {
        "size_gib": size_gib,
        "bytes": data_bytes,
        "cp_s": med["cp"],
        "startup_s": med["startup"],
        "startup_rss": rss["startup"],
        "rename_s": med["rename"],
        "rename_rss": rss["rename"],
        "cast_s": med["cast"],
        "cast_rss": rss["cast"],
        "naive_s": naive_wall,
        "naive_rss": naive_rss,
        "rename_work": statistics.median(works["rename"]),
        "cast_work": statistics.median(works["cast"]),
        "durable_s": med["durable"],
        "durable_work": statistics.median(works["durable"]),
        "cp_sync_s": med["cp_sync"],
    }


def verify(work: Path) -> None:
    """Correctness, not speed: rename and cast outputs hold exactly the expected tensors,
    and their recorded digests verify."""
    from safetensors import safe_open

    src = work / "verify_src"
    shard = make_checkpoint(src, 8 << 20)
    rename = rules_file(
        work, "rename", "  - {op: rename, pattern: '^', replace: 'model.'}\n", shard
    )
    cast = rules_file(work, "cast", "  - {op: cast, dtype: bfloat16}\n", shard)
    expected = {}
    for f in src.glob("*.safetensors"):
        with safe_open(f, framework="pt") as h:
            expected.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    for rules, name_of, value_of in (
        (rename, lambda k: "model." + k, lambda t: t),
        (cast, lambda k: k, lambda t: t.bfloat16()),
    ):
        out = work / "verify_out"
        subprocess.run(
            [*CLI, "apply", str(rules), "--source", str(src), "--output", str(out), "--quiet"],
            check=True,
        )
        # The digests recorded (copies take those hashed during start-up) match the bytes.
        subprocess.run([*CLI, "inspect", str(out), "--verify"], check=True, capture_output=True)
        got = {}
        for f in out.glob("*.safetensors"):
            with safe_open(f, framework="pt") as h:
                got.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
        assert sorted(got) == sorted(name_of(k) for k in expected), "wrong keys"
        for k, t in expected.items():
            assert torch_equal(got[name_of(k)], value_of(t)), k
        shutil.rmtree(out)
    print("verified: rename and cast outputs are exact")


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and torch.equal(a, b)


def check_7b(work: Path) -> tuple[float, int]:
    """`check` of a Llama-7B-shaped safetensors file against the model built on meta.

    The file is sparse (its data is never read, only its header), so it costs no disk."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ckptsurgeon.formats.safetensors_io import build_header
    from ckptsurgeon.formats.table import TensorRef

    kwargs = {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    }
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    items = [
        (n, TensorRef(tuple(t.shape), torch.bfloat16, lambda: None))
        for n, t in model.state_dict().items()
    ]
    params = sum(t.numel() for t in model.state_dict().values())
    header = build_header(items, {"format": "pt"})
    path = work / "llama7b.safetensors"
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(r.nbytes for _, r in items))
    wall, rss = timed(
        [
            *CLI,
            "check",
            str(path),
            "--target",
            "transformers:LlamaForCausalLM",
            "--kwargs",
            json.dumps(kwargs),
        ]
    )
    path.unlink()
    print(
        f"\n`check` against a {params / 1e9:.2f}B-parameter Llama built on the meta device: "
        f"{wall:.2f} s, {rss / (1 << 20):.0f} MiB peak RSS"
    )
    return wall, rss


def report(rows: list[dict[str, float]]) -> bool:
    mib = 1 << 20
    ok = True
    print("Work time = plan + write as `apply --report` records it (no start-up, no imports).")
    print("Targets are judged on wall - start-up (the issue's definition): `apply` hashes the")
    print("source's tensors while torch imports, which work time alone would leave out.\n")
    print(
        "| checkpoint | cp -r | rename --no-fsync: work / wall | cast bf16 --no-fsync: work / wall "
        "| naive load+save | rename / cp (work; wall - start-up) | cast / cp (work; wall - start-up) "
        "| RSS above start-up (rename, cast) | naive RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ren, ren_w = r["rename_work"] / r["cp_s"], (r["rename_s"] - r["startup_s"]) / r["cp_s"]
        cast, cast_w = r["cast_work"] / r["cp_s"], (r["cast_s"] - r["startup_s"]) / r["cp_s"]
        ren_rss = (r["rename_rss"] - r["startup_rss"]) / mib
        cast_rss = (r["cast_rss"] - r["startup_rss"]) / mib
        print(
            f"| {r['bytes'] / GiB:.2f} GiB, 5 shards | {r['cp_s']:.2f} s "
            f"| {r['rename_work']:.2f} s / {r['rename_s']:.2f} s "
            f"| {r['cast_work']:.2f} s / {r['cast_s']:.2f} s | {r['naive_s']:.2f} s "
            f"| {ren:.2f}x; {ren_w:.2f}x | {cast:.2f}x; {cast_w:.2f}x "
            f"| {ren_rss:.0f} / {cast_rss:.0f} MiB | {r['naive_rss'] / mib:.0f} MiB |"
        )
        # Judged as the issue defines it: wall minus start-up. Work time alone would not
        # count the source hashing `apply` does while torch imports.
        ok &= ren_w <= 1.5 and cast_w <= 2.0 and max(ren_rss, cast_rss) <= 256
    print("\nDurable writes (the default: fsync before the rename) against `cp -r && sync`:\n")
    print("| checkpoint | cp -r && sync | rename (durable): work / wall | work / (cp -r && sync) |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['bytes'] / GiB:.2f} GiB | {r['cp_sync_s']:.2f} s "
            f"| {r['durable_work']:.2f} s / {r['durable_s']:.2f} s "
            f"| {r['durable_work'] / r['cp_sync_s']:.2f}x |"
        )
    print(
        f"\nCLI start-up: {rows[0]['startup_s']:.2f} s, {rows[0]['startup_rss'] / mib:.0f} MiB RSS"
    )
    if len(rows) > 1:
        growth = max(rows[-1]["cast_rss"], rows[-1]["rename_rss"]) / max(
            rows[0]["cast_rss"], rows[0]["rename_rss"]
        )
        print(
            f"peak RSS growth from {rows[0]['size_gib']} to {rows[-1]['size_gib']} GiB: {growth:.2f}x"
        )
        ok &= growth <= 1.25
    print("targets met" if ok else "TARGETS MISSED")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.0, 4.0], help="GiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--verify-only",
        action="store_true",
        help="only check that the outputs are exact (what CI runs)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckptsurgeon-bench-", dir=args.workdir))
    try:
        verify(work)
        if args.verify_only:
            return
        rows = [bench(size, work, args.repeat) for size in args.sizes]
        ok = report(rows)
        _, rss = check_7b(work)
        ok &= rss < (1 << 30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
