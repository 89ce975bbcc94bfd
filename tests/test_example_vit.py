"""The example rules files rules/timm_vit_to_hf_vit.yaml and rules/hf_vit_to_timm_vit.yaml.

A small, seeded timm ViT is converted to transformers' ViTForImageClassification through
the CLI (split of the fused qkv), must load strictly and compute the same logits; converted
back (merge of q, k, v) it must equal the original state dict bit for bit. The model configs
are read from the rules files' ``target.kwargs``, so the test checks exactly what they declare.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, assert_same_tensors
from safetensors.torch import load_file, save_file

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

TO_HF = REPO / "rules" / "timm_vit_to_hf_vit.yaml"
TO_TIMM = REPO / "rules" / "hf_vit_to_timm_vit.yaml"
V5_KEY = "vit.layers.0.attention.q_proj.weight"  # transformers >= 5, what the rules name
V4_KEY = "vit.encoder.layer.0.attention.attention.query.weight"  # transformers 4.x


def target_kwargs(rules: Path) -> dict:
    return yaml.safe_load(rules.read_text())["target"]["kwargs"]


def build_timm() -> torch.nn.Module:
    return timm.create_model(**target_kwargs(TO_TIMM)).eval()


def build_hf() -> torch.nn.Module:
    config = transformers.ViTConfig(**target_kwargs(TO_HF))
    return transformers.ViTForImageClassification(config).eval()


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A seeded timm ViT whose every tensor (biases, norms, head too) is non-trivial."""
    with torch.device("meta"):
        hf_keys = build_hf().state_dict().keys()
    # The rules name transformers 5's ViT keys. transformers 4.x (the project allows 4.45)
    # names them differently, so the example cannot apply there: the only reason to skip.
    # Any other layout is a rename the rules must follow: a failure, not a skip.
    if V5_KEY not in hf_keys:
        if V4_KEY in hf_keys:
            pytest.skip(
                f"the example rules use the transformers >= 5 ViT key names ({V5_KEY}); "
                f"transformers {transformers.__version__} has the 4.x layout ({V4_KEY})"
            )
        pytest.fail(
            f"transformers {transformers.__version__}'s ViT has neither {V5_KEY} nor "
            f"{V4_KEY}: update {TO_HF.name} and {TO_TIMM.name}"
        )
    torch.manual_seed(0)
    model = build_timm()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("vit") / "vit_timm.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def to_hf(run_cli, source: Path, output: Path) -> None:
    proc = run_cli("apply", TO_HF, "--source", source, "--output", output)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert output.is_file()


def test_timm_to_hf_same_logits(timm_vit, run_cli, tmp_path: Path) -> None:
    timm_model, source = timm_vit
    output = tmp_path / "out" / "vit_hf.safetensors"
    to_hf(run_cli, source, output)

    hf_model = build_hf()
    hf_model.load_state_dict(load_file(str(output)), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = logits(timm_model, x)
    got = logits(hf_model, x)
    assert got.shape == expected.shape == (2, 10)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_round_trip_back_to_timm_is_bit_exact(timm_vit, run_cli, tmp_path: Path) -> None:
    timm_model, source = timm_vit
    hf_path = tmp_path / "vit_hf.safetensors"
    back = tmp_path / "out" / "vit_timm.safetensors"
    to_hf(run_cli, source, hf_path)
    proc = run_cli("apply", TO_TIMM, "--source", hf_path, "--output", back)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)

    original = {k: v.contiguous() for k, v in timm_model.state_dict().items()}
    restored = load_file(str(back))
    assert_same_tensors(original, restored)

    model = build_timm()
    model.load_state_dict(restored, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(model, x), logits(timm_model, x), atol=0, rtol=0)


def test_dry_run_reports_the_split(timm_vit, run_cli, tmp_path: Path) -> None:
    _, source = timm_vit
    output = tmp_path / "never_written.safetensors"
    proc = run_cli("apply", TO_HF, "--source", source, "--output", output, "--dry-run", "--json")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert not output.exists()
    report = json.loads(proc.stdout)
    assert report["dry_run"] is True
    keys = {entry["name"]: entry for entry in report["keys"]}

    depth = target_kwargs(TO_HF)["num_hidden_layers"]
    for layer in range(depth):
        for kind in ("weight", "bias"):
            fused = f"blocks.{layer}.attn.qkv.{kind}"
            assert fused not in keys
            for part in ("q", "k", "v"):
                entry = keys[f"vit.layers.{layer}.attention.{part}_proj.{kind}"]
                assert entry["sources"] == [fused], entry
                assert entry["actions"][0].startswith("split"), entry
    assert report["counts"]["split"] == 6 * depth
    assert report["check"]["ok"] is True
