"""DCP output: ``convert --format dcp`` and ``output.format: dcp`` write a
torch.distributed.checkpoint folder that ``dcp.load`` reads, atomically and one data file at
a time. (Loading it resharded into a two-process FSDP2 model: tests/test_fsdp2.py.)"""

from __future__ import annotations

import json
import os
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import assert_clean_failure, assert_same_tensors, materialise
from safetensors.torch import load_file

from ckptsurgeon.api import apply, convert
from ckptsurgeon.errors import InputError, RulesError, UsageError
from ckptsurgeon.formats import open_checkpoint
from ckptsurgeon.formats.table import TensorRef, from_tensor
from ckptsurgeon.formats.writer import write_checkpoint
from ckptsurgeon.job import Job
from ckptsurgeon.reporting.inspect import summarize
from ckptsurgeon.rules.document import load_rules


def dcp_load(folder: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``dcp.load`` in one process (no process group) into zeroed copies of ``like``."""
    state = {name: torch.zeros_like(t) for name, t in like.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process"
        dcp.load(state, checkpoint_id=str(folder))
    return state


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny transformers Llama saved with save_pretrained (config, safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    folder = tmp_path_factory.mktemp("hf") / "llama"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    return folder


def test_hf_folder_to_dcp_in_one_command_loads_into_the_model(
    run_cli, hf_llama: Path, tmp_path: Path
) -> None:
    from transformers import AutoConfig, LlamaForCausalLM

    out = tmp_path / "llama_dcp"
    proc = run_cli("convert", hf_llama, out, "--format", "dcp", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["kind"] == "dcp"
    # DCP's data, then its commit point; the provenance beside them; no temporaries left.
    assert sorted(os.listdir(out)) == [".metadata", "__0_0.distcp", "ckptsurgeon.json"]
    assert [os.path.basename(f) for f in result["files"]][-1] == ".metadata"
    assert not [n for n in os.listdir(tmp_path) if ".ckptsurgeon-tmp-" in n]

    source = load_file(hf_llama / "model.safetensors")
    model = LlamaForCausalLM(AutoConfig.from_pretrained(hf_llama)).to(torch.bfloat16)
    state = dcp_load(out, model.state_dict())
    assert_same_tensors(state, source)
    model.load_state_dict(state, strict=True)

    summary = summarize(open_checkpoint(str(out)))  # what inspect --json prints
    assert summary["format"] == "dcp"
    assert summary["tensors"]["lm_head.weight"] == {
        "shape": [64, 32],
        "dtype": "bfloat16",
        "bytes": 64 * 32 * 2,
    }
    provenance = json.loads((out / "ckptsurgeon.json").read_text())
    assert provenance["producer"].startswith("ckptsurgeon ")


def test_dtype_and_file_size_apply_to_dcp(hf_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "dcp"
    convert(str(hf_llama), str(out), format="dcp", dtype="float32", max_shard_size="20KB")
    data = sorted(n for n in os.listdir(out) if n.endswith(".distcp"))
    assert len(data) > 3
    for name in data:  # a tensor larger than the limit (none here) would sit alone
        assert os.path.getsize(out / name) < 20_000 + 16 * 1024  # + torch.save's framing
    source = {k: v.float() for k, v in load_file(hf_llama / "model.safetensors").items()}
    assert_same_tensors(dcp_load(out, source), source)


def test_rules_output_format_dcp_rewrites_replaces_and_is_up_to_date(
    resnet18_state, tmp_path: Path
) -> None:
    prefixed = {f"module.{k}": v for k, v in resnet18_state.items()}
    torch.save({"state_dict": prefixed}, tmp_path / "dp.pth")
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nsource: {path: dp.pth, key: state_dict}\n"
        "output: {path: out/resnet_dcp, format: dcp}\n"
        "rules:\n  - {op: strip_prefix, prefix: module.}\n"
    )
    report = apply(rules)
    assert report["written"]["files"][-1].endswith(".metadata")
    out = tmp_path / "out" / "resnet_dcp"
    assert_same_tensors(dcp_load(out, resnet18_state), resnet18_state)
    assert_same_tensors(materialise(open_checkpoint(str(out)).tensors), resnet18_state)

    assert Job.from_file(rules).up_to_date()  # what apply --skip-up-to-date asks
    before = (out / ".metadata").stat().st_mtime_ns
    apply(rules)  # replaces its own earlier DCP output
    assert (out / ".metadata").stat().st_mtime_ns != before
    assert_same_tensors(dcp_load(out, resnet18_state), resnet18_state)
    rules.write_text(rules.read_text().replace("module.}", "module., optional: true}"))
    assert not Job.from_file(rules).up_to_date()


def test_a_dcp_folder_it_did_not_write_is_not_replaced(tmp_path: Path) -> None:
    foreign = tmp_path / "step-100"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"w": torch.ones(3)}, checkpoint_id=str(foreign), no_dist=True)
    torch.save({"w": torch.zeros(3)}, tmp_path / "w.pt")
    with pytest.raises(UsageError, match="holding other files"):
        convert(str(tmp_path / "w.pt"), str(foreign), format="dcp")
    assert torch.equal(dcp_load(foreign, {"w": torch.ones(3)})["w"], torch.ones(3))


CONTRADICTIONS = [
    ("out.safetensors", "torch", "format torch writes one pickle file"),
    ("out_folder", "torch", "format torch writes one pickle file"),
    ("out.pt", "safetensors", "names a torch pickle"),
    ("out.pt", "dcp", "format dcp writes a folder"),
    ("out.safetensors", "dcp", "format dcp writes a folder"),
]


@pytest.mark.parametrize(("output", "fmt", "needle"), CONTRADICTIONS)
def test_a_format_that_contradicts_the_path_is_refused(
    tmp_path: Path, output: str, fmt: str, needle: str
) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"version: 1\nsource: w.pt\noutput: {{path: {output}, format: {fmt}}}\nrules: []\n"
    )
    with pytest.raises(RulesError, match=needle) as caught:
        load_rules(str(rules))
    assert "rules.yaml:3" in str(caught.value) and "format" in str(caught.value)
    with pytest.raises(UsageError, match=needle):  # --output given on the command line
        Job.from_mapping(
            {"source": "w.pt", "output": {"format": fmt}, "rules": []},
            base_dir=str(tmp_path),
            output=str(tmp_path / output),
        ).run(dry_run=True)
    with pytest.raises(UsageError, match=needle):
        convert(str(tmp_path / "w.pt"), str(tmp_path / output), format=fmt)
    assert sorted(os.listdir(tmp_path)) == ["rules.yaml", "w.pt"]


def test_a_contradiction_is_exit_2_from_the_cli(run_cli, tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\nsource: w.pt\noutput: {path: w.safetensors, format: torch}\n")
    assert_clean_failure(run_cli("validate", rules), 2, "rules.yaml:3", "format torch")
    proc = run_cli("convert", tmp_path / "w.pt", tmp_path / "out.pt", "--format", "dcp")
    assert_clean_failure(proc, 2, "format dcp writes a folder")
    assert sorted(os.listdir(tmp_path)) == ["rules.yaml", "w.pt"]


def test_suffix_choices_still_work_with_format_null_or_agreeing(tmp_path: Path) -> None:
    table = {"w": from_tensor(torch.arange(6.0).reshape(2, 3), "w")}
    for path, fmt, kind in [
        ("a.safetensors", None, "safetensors"),
        ("b.safetensors", "safetensors", "safetensors"),
        ("c.pt", "torch", "torch"),
        ("d", None, "folder"),
        ("e", "safetensors", "folder"),
        ("f.bin", None, "torch"),
    ]:
        assert write_checkpoint(table, str(tmp_path / path), format=fmt).kind == kind
    assert sorted(os.listdir(tmp_path / "d")) == ["model.safetensors"]
    with pytest.raises(UsageError, match="max_shard_size needs a folder"):
        write_checkpoint(table, str(tmp_path / "g.pt"), format="torch", max_shard_size="1KB")


class _Tracked:
    """Refs whose tensors are counted while alive: the most held at once while writing."""

    def __init__(self) -> None:
        self.alive = 0
        self.most = 0

    def ref(self, name: str, n: int) -> TensorRef:
        def load() -> torch.Tensor:
            tensor = torch.full((n,), float(len(name)))
            self.alive += 1
            self.most = max(self.most, self.alive)
            weakref.finalize(tensor, self._gone)
            return tensor

        return TensorRef((n,), torch.float32, load, None, (name,))

    def _gone(self) -> None:
        self.alive -= 1


def test_the_write_holds_one_data_file_of_tensors_at_a_time(tmp_path: Path) -> None:
    tracked = _Tracked()
    table = {f"layer{i}.w": tracked.ref(f"layer{i}.w", 1024) for i in range(12)}  # 4 KiB each
    write_checkpoint(table, str(tmp_path / "dcp"), format="dcp", max_shard_size="8KiB")
    assert len([n for n in os.listdir(tmp_path / "dcp") if n.endswith(".distcp")]) == 6
    assert 1 <= tracked.most <= 3, tracked.most  # a file's two tensors (and one leaving)
    like = {name: torch.zeros(1024) for name in table}
    state = dcp_load(tmp_path / "dcp", like)
    assert all(torch.equal(state[n], torch.full((1024,), float(len(n)))) for n in table)


def test_a_source_that_fails_mid_write_leaves_nothing(tmp_path: Path) -> None:
    def corrupt() -> torch.Tensor:
        raise InputError("src.safetensors: file ended early (truncated?)")

    table = {
        "a": from_tensor(torch.ones(4), "a"),
        "b": TensorRef((4,), torch.float32, corrupt, None, ("b",)),
    }
    with pytest.raises(InputError, match="truncated"):  # DCP's wrapper taken off
        write_checkpoint(table, str(tmp_path / "out" / "dcp"), format="dcp")
    assert not (tmp_path / "out").exists()
