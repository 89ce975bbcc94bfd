"""The Python API in the ecosystem's habits: save beside load, load to a device, load_into a
meta-device model with assign, apply a rules mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ckptsurgeon


def test_save_writes_what_load_reads_atomically_and_sharded(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(64, 64), "b": torch.arange(10), "c": torch.randn(3).half()}
    result = ckptsurgeon.save(tensors, tmp_path / "one.safetensors")
    loaded = ckptsurgeon.load(result.path)
    assert sorted(loaded) == ["a", "b", "c"]
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(result.path, "pt") as f:  # what transformers expects, and our provenance
        assert f.metadata()["format"] == "pt" and f.metadata()["producer"].startswith("ckpt")

    folder = ckptsurgeon.save(tensors, tmp_path / "sharded", max_shard_size="10KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and len(folder.files) > 2
    assert torch.equal(ckptsurgeon.load(folder.path)["a"], tensors["a"])


def test_load_to_a_device_and_into_a_meta_model_with_assign(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 3)
    path = ckptsurgeon.save(model.state_dict(), tmp_path / "m.safetensors").path
    assert ckptsurgeon.load(path, device="meta")["weight"].is_meta

    with torch.device("meta"):
        empty = torch.nn.Linear(4, 3)
    ckptsurgeon.load_into(empty, path, assign=True)
    assert not empty.weight.is_meta and torch.equal(empty.weight, model.weight)


def test_apply_takes_a_rules_mapping(tmp_path: Path, monkeypatch) -> None:
    ckptsurgeon.save({"module.w": torch.ones(2)}, tmp_path / "dp.safetensors")
    monkeypatch.chdir(tmp_path)  # a mapping's paths are relative to the working directory
    report = ckptsurgeon.apply(
        {
            "source": "dp.safetensors",
            "output": "out.safetensors",
            "rules": [{"op": "strip_prefix", "prefix": "module."}],
        }
    )
    assert report["written"]["path"] == str(tmp_path / "out.safetensors")
    assert list(ckptsurgeon.load(tmp_path / "out.safetensors")) == ["w"]
    with pytest.raises(ckptsurgeon.RulesError, match="unknown op"):
        ckptsurgeon.apply({"rules": [{"op": "nope"}]})
