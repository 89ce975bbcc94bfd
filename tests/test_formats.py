"""Readers and writers on checkpoints written by the real libraries; round trips are bit-exact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_same_tensors, materialise

from ckptsurgeon.errors import UsageError
from ckptsurgeon.formats import open_checkpoint, write_checkpoint
from ckptsurgeon.formats.writer import parse_size, plan_shards


def test_plain_torchvision_state_dict(tmp_path: Path, resnet18_state) -> None:
    path = tmp_path / "r18.pth"
    torch.save(resnet18_state, path)
    ckpt = open_checkpoint(path)
    assert ckpt.format == "torch-zip"
    assert ckpt.note == "tensors at the top level"
    assert_same_tensors(materialise(ckpt.tensors), resnet18_state)


def test_dataparallel_keeps_module_prefix(tmp_path: Path) -> None:
    import torchvision

    model = torch.nn.DataParallel(torchvision.models.resnet18(num_classes=3))
    torch.save(model.state_dict(), tmp_path / "dp.pth")
    ckpt = open_checkpoint(tmp_path / "dp.pth")
    assert all(name.startswith("module.") for name in ckpt.tensors)
    assert len(ckpt.tensors) == 122


def test_torch_compile_inside_training_container(tmp_path: Path) -> None:
    import torchvision

    model = torchvision.models.resnet18(num_classes=3)
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    torch.save(
        {"model": compiled.state_dict(), "optimizer": opt.state_dict(), "epoch": 4},
        tmp_path / "train.pt",
    )
    ckpt = open_checkpoint(tmp_path / "train.pt")
    assert ckpt.container == "model"
    assert "optimizer/state/0" in ckpt.containers  # found, explained, not chosen
    assert all(name.startswith("_orig_mod.") for name in ckpt.tensors)
    # --key picks another container explicitly
    other = open_checkpoint(tmp_path / "train.pt", key="optimizer/state/0")
    assert list(other.tensors) == ["momentum_buffer"]
    with pytest.raises(UsageError, match="no tensor container"):
        open_checkpoint(tmp_path / "train.pt", key="nope")


def test_imagenet_example_checkpoint_picks_state_dict_over_a_top_level_tensor(
    tmp_path: Path, resnet18_state
) -> None:
    """PyTorch's ImageNet example saves best_acc1 as a tensor beside ``state_dict``."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoint = {
        "epoch": 90,
        "arch": "resnet18",
        "state_dict": resnet18_state,
        "best_acc1": torch.tensor(69.76),
        "optimizer": opt.state_dict(),
    }
    torch.save(checkpoint, tmp_path / "checkpoint.pth.tar")
    ckpt = open_checkpoint(tmp_path / "checkpoint.pth.tar")
    assert ckpt.container == "state_dict"
    assert "1 tensor(s) at the top level" in ckpt.note
    assert_same_tensors(materialise(ckpt.tensors), resnet18_state)
    assert list(open_checkpoint(tmp_path / "checkpoint.pth.tar", key="").tensors) == ["best_acc1"]


def test_legacy_format(tmp_path: Path, resnet18_state) -> None:
    path = tmp_path / "legacy.pth"
    torch.save(resnet18_state, path, _use_new_zipfile_serialization=False)
    ckpt = open_checkpoint(path)
    assert ckpt.format == "torch-legacy"
    assert_same_tensors(materialise(ckpt.tensors), resnet18_state)


def test_lightning_trainer_checkpoint(tmp_path: Path) -> None:
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
            )

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    module = Tiny()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path / "last.ckpt")

    ckpt = open_checkpoint(tmp_path / "last.ckpt")
    assert ckpt.container == "state_dict"
    assert sorted(ckpt.tensors) == sorted(f"net.{k}" for k in module.net.state_dict())
    assert_same_tensors(materialise(ckpt.tensors), module.state_dict())


def test_transformers_sharded_save_pretrained(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=500,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
        )
    )
    model.save_pretrained(tmp_path / "bert", max_shard_size="200KB")
    shards = sorted(p.name for p in (tmp_path / "bert").glob("*.safetensors"))
    assert len(shards) > 1
    for path in (tmp_path / "bert", tmp_path / "bert" / "model.safetensors.index.json"):
        ckpt = open_checkpoint(path)
        assert ckpt.format == "safetensors-sharded"
        expected = model.state_dict()
        loaded = materialise(ckpt.tensors)
        for name, tensor in loaded.items():
            assert torch.equal(tensor, expected[name]), name


def test_pytorch_model_bin_index(tmp_path: Path, resnet18_state) -> None:
    from huggingface_hub import save_torch_state_dict

    (tmp_path / "bin").mkdir()
    save_torch_state_dict(
        resnet18_state, tmp_path / "bin", safe_serialization=False, max_shard_size="10MB"
    )
    assert (tmp_path / "bin" / "pytorch_model.bin.index.json").exists()
    ckpt = open_checkpoint(tmp_path / "bin")
    assert ckpt.format == "torch-sharded"
    assert_same_tensors(materialise(ckpt.tensors), resnet18_state)


def test_timm_model(tmp_path: Path) -> None:
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=5)
    torch.save(
        {"state_dict": model.state_dict(), "epoch": 1, "arch": "resnet18"},
        tmp_path / "timm.pth.tar",
    )
    ckpt = open_checkpoint(tmp_path / "timm.pth.tar")
    assert ckpt.container == "state_dict"
    assert_same_tensors(materialise(ckpt.tensors), model.state_dict())


def test_dcp_folder(tmp_path: Path, resnet18_state) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": resnet18_state, "step": 7}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    ckpt = open_checkpoint(tmp_path / "dcp")
    assert ckpt.format == "dcp"
    assert ckpt.container == "model"
    assert_same_tensors(materialise(ckpt.tensors), resnet18_state)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ""])
def test_round_trip_is_bit_exact(tmp_path: Path, suffix: str) -> None:
    state = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 2).half(),
        "i64": torch.arange(6).reshape(2, 3),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    torch.save(state, tmp_path / "in.pt")
    out = tmp_path / f"out{suffix}"
    write_checkpoint(open_checkpoint(tmp_path / "in.pt").tensors, str(out))
    assert_same_tensors(materialise(open_checkpoint(out).tensors), state)


def test_safetensors_output_reads_with_the_safetensors_library(
    tmp_path: Path, resnet18_state
) -> None:
    from safetensors import safe_open

    torch.save(resnet18_state, tmp_path / "in.pt")
    write_checkpoint(
        open_checkpoint(tmp_path / "in.pt").tensors,
        str(tmp_path / "o.safetensors"),
        metadata={"source": "in.pt"},
    )
    with safe_open(tmp_path / "o.safetensors", framework="pt") as f:
        assert f.metadata()["source"] == "in.pt"
        assert f.metadata()["format"] == "pt"
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            assert torch.equal(f.get_tensor(name), resnet18_state[name]), name


def test_sharding_matches_huggingface_hub(tmp_path: Path, resnet18_state) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    torch.save(resnet18_state, tmp_path / "in.pt")
    table = open_checkpoint(tmp_path / "in.pt").tensors
    result = write_checkpoint(table, str(tmp_path / "sharded"), max_shard_size="10MB")
    hub = split_torch_state_dict_into_shards(resnet18_state, max_shard_size="10MB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == hub.tensor_to_filename
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in resnet18_state.values())
    assert len(result.files) == len(hub.filename_to_tensors) + 1
    assert_same_tensors(materialise(open_checkpoint(tmp_path / "sharded").tensors), resnet18_state)


def test_one_shard_means_no_index(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(3)}, tmp_path / "in.pt")
    write_checkpoint(open_checkpoint(tmp_path / "in.pt").tensors, str(tmp_path / "folder"))
    assert sorted(os.listdir(tmp_path / "folder")) == ["model.safetensors"]


def test_parse_size_uses_decimal_units_like_huggingface() -> None:
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 500_000_000
    assert parse_size(1234) == 1234
    with pytest.raises(UsageError):
        parse_size("lots")


def test_plan_shards_puts_an_oversized_tensor_alone() -> None:
    from ckptsurgeon.formats.table import from_tensor

    items = [
        (n, from_tensor(torch.zeros(size, dtype=torch.uint8), n))
        for n, size in [("a", 4), ("b", 4), ("big", 20), ("c", 3)]
    ]
    shards = plan_shards(items, 10)
    assert [[n for n, _ in s] for s in shards] == [["a", "b"], ["big"], ["c"]]


def test_writes_are_atomic_and_leave_nothing_on_failure(tmp_path: Path) -> None:
    from ckptsurgeon.formats.table import TensorRef

    def boom() -> torch.Tensor:
        raise RuntimeError("disk on fire")

    good = {"a": TensorRef((2,), torch.float32, lambda: torch.ones(2), None, ("a",))}
    write_checkpoint(good, str(tmp_path / "o.safetensors"))
    before = (tmp_path / "o.safetensors").read_bytes()
    bad = {"a": TensorRef((2,), torch.float32, boom, None, ("a",))}
    for out in ("o.safetensors", "folder", "o.pt"):
        with pytest.raises(RuntimeError, match="disk on fire"):
            write_checkpoint(bad, str(tmp_path / out))
    assert (tmp_path / "o.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["o.safetensors"]  # no temporaries, no partials


def test_aliased_tensors_are_reported_and_written_as_copies(tmp_path: Path) -> None:
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied, as language models do
    state = {"emb.weight": emb.weight.data, "head.weight": head.weight.data}
    torch.save(state, tmp_path / "tied.pt")
    ckpt = open_checkpoint(tmp_path / "tied.pt")
    assert ckpt.aliases == {"head.weight": "emb.weight"}
    write_checkpoint(ckpt.tensors, str(tmp_path / "tied.safetensors"))
    out = materialise(open_checkpoint(tmp_path / "tied.safetensors").tensors)
    assert torch.equal(out["emb.weight"], out["head.weight"])


def test_output_into_the_source_is_refused(tmp_path: Path, run_cli) -> None:
    from conftest import assert_clean_failure

    torch.save({"a": torch.ones(2)}, tmp_path / "in.pt")
    before = (tmp_path / "in.pt").read_bytes()
    proc = run_cli("convert", tmp_path / "in.pt", tmp_path / "in.pt")
    assert_clean_failure(proc, 2, "would overwrite the input")
    assert (tmp_path / "in.pt").read_bytes() == before
