"""LoRA merge benchmark: ``apply`` with ``merge_lora`` vs ``cp`` and vs PEFT's own merge.

Generates a Llama-shaped float32 model of about 1 GiB (a Hugging Face folder: config.json
and model.safetensors, seeded random weights) and a rank-16 LoRA adapter on every
projection (q, k, v, o, gate, up, down), written as PEFT writes one (adapter_config.json and
adapter_model.safetensors, ``base_model.model.``-prefixed names). Then measures, on a warm
page cache, in one run:

* ``cp`` of the base weights, and ``cp && sync`` (the floor: copying the bytes);
* CLI start-up: ``ckptsurgeon apply`` on a tiny checkpoint (imports, a model-free plan);
* ``apply`` merging the adapter into a safetensors file, with ``--no-fsync`` (as ``cp``)
  and durable (the default, as ``cp && sync``); besides the wall time, its own work (plan
  and write, from ``--report``'s ``seconds``: no interpreter start-up or imports);
* PEFT: ``LlamaForCausalLM.from_pretrained``, ``PeftModel.from_pretrained``,
  ``merge_and_unload()``, ``save_pretrained`` (what a user would otherwise run).

Each contender's wall time (median of the rounds) and peak RSS (``ru_maxrss`` of its
process; "above start-up" subtracts the tiny apply's) are printed as a table, and the two
merged outputs are compared tensor by tensor (they must agree to float32 rounding).

    python benchmarks/bench_merge_lora.py                 # about 1 GiB
    python benchmarks/bench_merge_lora.py --size 0.05     # a quick smoke run
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
from pathlib import Path

from measure import timed  # a sibling module: the benchmarks run as scripts

GiB = 1 << 30
MiB = 1 << 20
CLI = [sys.executable, "-m", "ckptsurgeon"]
RANK = 16
PROJECTIONS = {
    "self_attn.q_proj": ("hidden", "hidden"),
    "self_attn.k_proj": ("hidden", "hidden"),
    "self_attn.v_proj": ("hidden", "hidden"),
    "self_attn.o_proj": ("hidden", "hidden"),
    "mlp.gate_proj": ("inter", "hidden"),
    "mlp.up_proj": ("inter", "hidden"),
    "mlp.down_proj": ("hidden", "inter"),
}

PEFT_MERGE = textwrap.dedent("""
    import sys, torch
    from transformers import LlamaForCausalLM
    from peft import PeftModel
    base, adapter, out = sys.argv[1:4]
    model = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)
""")


def llama_config(size_gib: float) -> dict:
    """Llama-like shapes whose float32 weights come to about ``size_gib``."""
    hidden, inter, vocab = (2048, 5632, 4096) if size_gib >= 0.5 else (256, 704, 1024)
    per_layer = 4 * (4 * hidden * hidden + 3 * hidden * inter)
    layers = max(1, round((size_gib * GiB - 2 * 4 * vocab * hidden) / per_layer))
    heads = hidden // 128 if hidden >= 1024 else 4
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": vocab,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def make_base(folder: Path, config: dict) -> Path:
    """config.json + model.safetensors with LlamaForCausalLM's names, seeded."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    dims = {"hidden": hidden, "inter": inter}
    state = {"model.embed_tokens.weight": torch.randn(config["vocab_size"], hidden, generator=gen)}
    for i in range(config["num_hidden_layers"]):
        for proj, (out_dim, in_dim) in PROJECTIONS.items():
            shape = (dims[out_dim], dims[in_dim])
            state[f"model.layers.{i}.{proj}.weight"] = torch.randn(shape, generator=gen) * 0.02
        state[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden)
        state[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(hidden)
    state["model.norm.weight"] = torch.ones(hidden)
    state["lm_head.weight"] = torch.randn(config["vocab_size"], hidden, generator=gen) * 0.02
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder / "model.safetensors"


def make_adapter(folder: Path, config: dict) -> None:
    """A rank-16 adapter on every projection, laid out as PEFT's save_pretrained writes it."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    dims = {"hidden": config["hidden_size"], "inter": config["intermediate_size"]}
    state = {}
    for i in range(config["num_hidden_layers"]):
        for proj, (out_dim, in_dim) in PROJECTIONS.items():
            name = f"base_model.model.model.layers.{i}.{proj}"
            state[f"{name}.lora_A.weight"] = torch.randn(RANK, dims[in_dim], generator=gen) * 0.01
            state[f"{name}.lora_B.weight"] = torch.randn(dims[out_dim], RANK, generator=gen) * 0.01
    folder.mkdir(parents=True)
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": 32,
        "target_modules": sorted({p.split(".")[1] for p in PROJECTIONS}),
        "base_model_name_or_path": None,
        "task_type": "CAUSAL_LM",
        "lora_dropout": 0.0,
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))


def max_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between same-named tensors of two safetensors files
    (both must hold the same names)."""
    from safetensors import safe_open

    worst = 0.0
    with safe_open(a, framework="pt") as fa, safe_open(b, framework="pt") as fb:
        names_a, names_b = set(fa.keys()), set(fb.keys())
        assert names_a == names_b, sorted(names_a ^ names_b)[:5]
        for name in sorted(names_a):
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            assert x.dtype == y.dtype and x.shape == y.shape, name
            worst = max(worst, (x - y).abs().max().item())
    return worst


def bench(size_gib: float, work: Path, rounds: int) -> dict:
    config = llama_config(size_gib)
    base_dir = work / "base"
    base = make_base(base_dir, config)
    adapter = work / "adapter"
    make_adapter(adapter, config)
    out = work / "merged.safetensors"
    rules = work / "merge.yaml"
    rules.write_text(f"version: 1\nrules:\n  - {{op: merge_lora, adapter: {adapter}}}\n")
    tiny = work / "tiny.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.ones(4)}, tiny)
    (work / "tiny.yaml").write_text(
        "version: 1\nrules:\n  - {op: rename, pattern: '^', replace: 'm.'}\n"
    )

    report = work / "report.json"

    def apply(*flags: str) -> list[str]:
        return [*CLI, "apply", str(rules), "--source", str(base), "--output", str(out),
                "--quiet", "--report", str(report), *flags]  # fmt: skip

    contenders = {
        "cp": ["cp", str(base), str(out)],
        "cp && sync": ["sh", "-c", f"cp '{base}' '{out}' && sync"],
        "startup (tiny apply)": [*CLI, "apply", str(work / "tiny.yaml"), "--source", str(tiny),
                                 "--output", str(work / "tiny_out.safetensors"), "--quiet"],
        "apply merge_lora --no-fsync": apply("--no-fsync"),
        "apply merge_lora (durable)": apply(),
    }  # fmt: skip
    warm = ["cat", str(base), str(adapter / "adapter_model.safetensors")]
    subprocess.run(warm, stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    walls: dict[str, list[float]] = {k: [] for k in contenders}
    works: dict[str, list[float]] = {k: [] for k in contenders if k.startswith("apply")}
    rss: dict[str, int] = dict.fromkeys(contenders, 0)
    for _ in range(rounds):
        for name, cmd in contenders.items():
            if out.exists():
                out.unlink()
            os.sync()
            wall, peak = timed(cmd)
            walls[name].append(wall)
            rss[name] = max(rss[name], peak)
            if name in works:  # the work itself: plan + write, without start-up
                seconds = json.loads(report.read_text())["seconds"]
                works[name].append(seconds["plan"] + seconds["write"])
    ours = work / "ours.safetensors"
    shutil.move(out, ours)
    peft_out = work / "peft_out"
    peft_wall, peft_rss = timed(
        [sys.executable, "-c", PEFT_MERGE, str(base_dir), str(adapter), str(peft_out)]
    )
    walls["peft load + merge_and_unload + save"] = [peft_wall]
    rss["peft load + merge_and_unload + save"] = peft_rss
    diff = max_difference(ours, peft_out / "model.safetensors")
    return {
        "size_bytes": base.stat().st_size,
        "layers": config["num_hidden_layers"],
        "seconds": {k: statistics.median(v) for k, v in walls.items()},
        "work": {k: statistics.median(v) for k, v in works.items()},
        "rounds": {k: [round(x, 2) for x in v] for k, v in walls.items()},
        "rss": rss,
        "max_abs_diff_vs_peft": diff,
    }


def table(result: dict) -> str:
    startup_rss = result["rss"]["startup (tiny apply)"]
    lines = [
        "| contender | wall s | work s (plan + write) | peak RSS MiB | RSS above start-up MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, secs in result["seconds"].items():
        peak = result["rss"][name]
        work = result["work"].get(name)
        above = f"{(peak - startup_rss) / MiB:.0f}" if name in result["work"] else ""
        work_text = f"{work:.2f}" if work is not None else ""
        lines.append(f"| {name} | {secs:.2f} | {work_text} | {peak / MiB:.0f} | {above} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=1.0, help="base model size in GiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch folder (default: a temp dir)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.work, prefix="bench_lora_"))
    try:
        result = bench(args.size, work, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"base: {result['size_bytes'] / GiB:.2f} GiB float32 ({result['layers']} layers), "
        f"adapter: rank {RANK} on 7 projections per layer"
    )
    print(f"seconds per round: {result['rounds']}")
    print(f"apply work per round (median): {result['work']}")
    print(table(result))
    diff = result["max_abs_diff_vs_peft"]
    print(f"merged output vs PEFT's: max |difference| {diff:.3g}")
    if diff > 1e-6:
        raise SystemExit("the merged outputs disagree")


if __name__ == "__main__":
    main()
