"""What verification costs, beside the conversion it checks (CPU).

A timm ViT-B/16 (86 M parameters, 344 MB of fp32 weights) is converted to transformers'
ViTForImageClassification with ``rules/timm_vit_to_hf_vit.yaml``'s rules, side by side in
one run: ``apply`` without a ``verify:`` section, and ``apply`` with one (the timm model
as reference, logits compared on one 224 x 224 image). Each round runs both; the table gives
the medians. Peak RSS is each child's ``ru_maxrss``; the memory target is "the two models
plus activations, no third copy of the weights": peak RSS with verify minus peak RSS
without stays under 2x the weights' bytes plus the activations.

    python benchmarks/bench_verify.py              # ViT-B/16, 3 rounds
    python benchmarks/bench_verify.py --quick      # a tiny ViT, 1 round (CI uses this)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from measure import timed

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "ckptsurgeon"]

BASE = {"model_name": "vit_base_patch16_224", "num_classes": 1000}
BASE_HF = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "image_size": 224, "patch_size": 16, "num_labels": 1000,
}  # fmt: skip
TINY = {"model_name": "vit_tiny_patch16_224", "num_classes": 10, "img_size": 32,
        "patch_size": 8, "depth": 2}  # fmt: skip
TINY_HF = {
    "hidden_size": 192, "num_hidden_layers": 2, "num_attention_heads": 3,
    "intermediate_size": 768, "image_size": 32, "patch_size": 8, "num_labels": 10,
}  # fmt: skip


def make_source(work: Path, timm_kwargs: dict) -> tuple[Path, int]:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(**timm_kwargs)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = work / "vit_timm.safetensors"
    save_file(state, path)
    return path, sum(t.numel() * t.element_size() for t in state.values())


def rules_files(work: Path, source: Path, timm_kwargs: dict, hf_kwargs: dict, size: int):
    doc = yaml.safe_load((REPO / "rules" / "timm_vit_to_hf_vit.yaml").read_text())
    doc["source"] = str(source)
    doc["target"]["kwargs"] = {**doc["target"]["kwargs"], **hf_kwargs}
    doc["verify"]["reference"]["kwargs"] = timm_kwargs
    doc["verify"]["inputs"] = [{"shape": [1, 3, size, size]}]
    with_verify = work / "with_verify.yaml"
    doc["output"] = {"path": str(work / "out_verify.safetensors")}
    with_verify.write_text(yaml.safe_dump(doc, sort_keys=False))
    del doc["verify"]
    doc["output"] = {"path": str(work / "out_plain.safetensors")}
    plain = work / "plain.yaml"
    plain.write_text(yaml.safe_dump(doc, sort_keys=False))
    return plain, with_verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny ViT, one round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    timm_kwargs, hf_kwargs = (TINY, TINY_HF) if args.quick else (BASE, BASE_HF)
    size = hf_kwargs["image_size"]
    rounds = 1 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source, weights = make_source(work, timm_kwargs)
        plain, with_verify = rules_files(work, source, timm_kwargs, hf_kwargs, size)
        runs: dict[str, list[tuple[float, int]]] = {"apply": [], "apply + verify": []}
        for _ in range(rounds):
            for name, rules in (("apply", plain), ("apply + verify", with_verify)):
                runs[name].append(timed([*CLI, "apply", str(rules), "--no-fsync", "-q"]))
        report = json.loads(
            subprocess.run(
                [*CLI, "verify", str(with_verify), "--json"],
                capture_output=True, text=True, check=True,
            ).stdout
        )  # fmt: skip
    mib = 2**20
    print(f"model: {timm_kwargs['model_name']}, weights {weights / mib:.0f} MiB (fp32), "
          f"{rounds} round(s), medians")  # fmt: skip
    print(f"{'':16} {'seconds':>8} {'peak RSS MiB':>13}")
    med = {}
    for name, values in runs.items():
        wall = statistics.median(v[0] for v in values)
        rss = statistics.median(v[1] for v in values)
        med[name] = (wall, rss)
        print(f"{name:16} {wall:8.2f} {rss / mib:13.0f}")
    (t0, r0), (t1, r1) = med["apply"], med["apply + verify"]
    beyond = (r1 - r0 - 2 * weights) / mib
    print(f"verify costs {t1 / t0:.2f}x the time of apply alone; extra peak RSS "
          f"{(r1 - r0) / mib:.0f} MiB = the two models ({2 * weights / mib:.0f} MiB) "
          f"{'+' if beyond >= 0 else '-'} {abs(beyond):.0f} MiB (activations; target: no "
          "third copy of the weights)")  # fmt: skip
    output = report["compared"][0]
    print(f"verified: ok={report['ok']}, logits max abs err {output['max_abs_err']:.2e}, "
          f"top-1 agreement {output.get('top1_agreement', 1.0):.0%}")  # fmt: skip
    if not report["ok"]:
        raise SystemExit("verification failed")


if __name__ == "__main__":
    main()
