"""What ``inspect --json`` of a safetensors folder costs now that it reads headers only.

A Llama-shaped checkpoint (bf16, about 1 GiB) is saved in Hugging Face's sharded layout
(``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``, written by
huggingface_hub's ``save_torch_state_dict``), then three commands run in turn, each round:

* ``python -c pass``: the interpreter alone, the floor;
* ``ckptsurgeon inspect --json FOLDER``: the CLI, which never imports torch for it;
* the path ``inspect`` took before: ``python -c`` importing torch and the reader, then
  ``open_checkpoint`` + ``summarize``, printing the same JSON.

The table gives the medians of wall seconds and peak RSS (``benchmarks/measure.py``); the
target is under 0.3 s and under 100 MiB beyond ``python -c pass``. The CLI's JSON is checked
to equal the old path's, byte for byte.

    python benchmarks/bench_inspect.py            # ~1 GiB, 5 rounds
    python benchmarks/bench_inspect.py --quick    # ~64 MiB, 1 round
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import timed

MIB = 2**20
TARGET_SECONDS = 0.3
TARGET_MIB = 100

OLD_PATH = (
    "import json, sys\n"
    "from ckptsurgeon.formats.reader import open_checkpoint\n"
    "from ckptsurgeon.reporting.inspect import summarize\n"
    "print(json.dumps(summarize(open_checkpoint(sys.argv[1])), indent=2))\n"
)


def make_folder(folder: Path, layers: int, hidden: int, inter: int, vocab: int) -> int:
    """A Llama-shaped bf16 state dict saved as HF shards; returns its bytes."""
    import torch
    from huggingface_hub import save_torch_state_dict

    def t(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.bfloat16)

    state = {"model.embed_tokens.weight": t(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"{p}self_attn.{name}.weight"] = t(hidden, hidden)
        state[f"{p}mlp.gate_proj.weight"] = t(inter, hidden)
        state[f"{p}mlp.up_proj.weight"] = t(inter, hidden)
        state[f"{p}mlp.down_proj.weight"] = t(hidden, inter)
        state[f"{p}input_layernorm.weight"] = t(hidden)
        state[f"{p}post_attention_layernorm.weight"] = t(hidden)
    state["model.norm.weight"] = t(hidden)
    state["lm_head.weight"] = t(vocab, hidden)
    folder.mkdir()
    total = sum(v.numel() * v.element_size() for v in state.values())
    save_torch_state_dict(state, folder, max_shard_size=max(total // 4, 1 << 20))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~64 MiB, one round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    shape = (2, 1024, 2752, 8000) if args.quick else (8, 2048, 5504, 32000)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        total = make_folder(folder, *shape)
        shards = len(list(folder.glob("*.safetensors")))
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "inspect --json": [sys.executable, "-m", "ckptsurgeon", "inspect", "--json", str(folder)],
            "old path": [sys.executable, "-c", OLD_PATH, str(folder)],
        }  # fmt: skip
        outputs = {
            name: subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            for name, cmd in commands.items()
            if name != "python -c pass"
        }  # also warms the page cache and the bytecode caches
        if outputs["inspect --json"] != outputs["old path"]:
            raise SystemExit("inspect --json differs from the old path's JSON")
        runs: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
        for _ in range(rounds):
            for name, cmd in commands.items():
                runs[name].append(timed(cmd))
    print(
        f"{folder.name}: {total / 2**30:.2f} GiB bf16 in {shards} shards + index, "
        f"{rounds} round(s), medians"
    )
    print(f"{'':16} {'seconds':>8} {'peak RSS MiB':>13} {'beyond pass: s':>15} {'MiB':>6}")
    med = {
        name: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v))
        for name, v in runs.items()
    }
    base_wall, base_rss = med["python -c pass"]
    for name, (wall, rss) in med.items():
        print(
            f"{name:16} {wall:8.3f} {rss / MIB:13.1f} {wall - base_wall:15.3f} "
            f"{(rss - base_rss) / MIB:6.1f}"
        )
    wall, rss = med["inspect --json"]
    old_wall, old_rss = med["old path"]
    print(
        f"inspect --json: {old_wall / wall:.1f}x faster than the old path, "
        f"{(old_rss - rss) / MIB:.0f} MiB less peak RSS; output identical"
    )
    ok = wall < TARGET_SECONDS and (rss - base_rss) / MIB < TARGET_MIB
    print(
        f"target (under {TARGET_SECONDS} s, under {TARGET_MIB} MiB beyond python -c pass): "
        f"{'met' if ok else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
