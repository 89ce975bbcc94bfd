"""Tied weights (one Parameter under several names, as tied embeddings are): a checkpoint
that holds one name of a tied group is complete, as ``from_pretrained`` sees it.

Real transformers models with ``tie_word_embeddings`` saved by ``save_pretrained``, which
stores a shared tensor once (``model.embed_tokens.weight``, no ``lm_head.weight``), through
the real CLI: ``check``, ``apply`` with a ``verify:`` section, ``diff --suggest``, and the
Python API's ``load_into``. Each CLI run costs seconds (torch and transformers load), so
the secondary assertions ask the Python API, which runs the same code in-process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_clean_failure
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckptsurgeon
from ckptsurgeon.targets.check import CheckResult

transformers = pytest.importorskip("transformers")

LLAMA = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
    "tie_word_embeddings": True,
}
GPT2 = {
    "vocab_size": 64,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 32,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
LLAMA_TARGET = ("--target", "transformers:LlamaForCausalLM", "--kwargs", json.dumps(LLAMA))
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
INPUTS = [{"name": "input_ids", "shape": [2, 8], "dtype": "int64", "high": 64}]


def _save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def _names(path: Path) -> list[str]:
    with safe_open(path, "pt") as f:
        return list(f.keys())


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    return model


@pytest.fixture(scope="module")
def llama_folder(llama: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = _save(llama, tmp_path_factory.mktemp("tied") / "llama")
    names = _names(folder / "model.safetensors")
    assert EMBED in names and HEAD not in names  # the premise: the shared tensor stored once
    return folder


def _check(path: Path, **changes: object) -> CheckResult:
    return ckptsurgeon.check(path, LLAMA_TARGET[1], kwargs={**LLAMA, **changes})


def _copy_with_head(folder: Path, dest: Path, head: torch.Tensor) -> Path:
    """``folder`` with ``lm_head.weight`` written next to the embeddings."""
    dest.mkdir()
    shutil.copy(folder / "config.json", dest / "config.json")
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, HEAD: head}, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_a_tied_llama_passes_the_strict_check(run_cli, llama_folder: Path) -> None:
    proc = run_cli("check", llama_folder, *LLAMA_TARGET, "--json")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    result = json.loads(proc.stdout)
    assert result["ok"] and result["missing"] == []
    assert result["tied"] == [{"name": HEAD, "tied_to": EMBED}]
    (line,) = [ln for ln in _check(llama_folder).lines() if HEAD in ln]
    assert f"{HEAD} (shares {EMBED})" in line
    assert "load_state_dict(strict=True) reports them missing" in line


def test_a_tied_gpt2_passes_the_strict_check(run_cli, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2))
    assert model.lm_head.weight is model.transformer.wte.weight  # tied by default
    folder = _save(model, tmp_path / "gpt2")
    assert HEAD not in _names(folder / "model.safetensors")
    target = ("--target", "transformers:GPT2LMHeadModel", "--kwargs", json.dumps(GPT2))
    proc = run_cli("check", folder, *target, "--json")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    result = json.loads(proc.stdout)
    assert result["missing"] == [] and result["unexpected"] == []
    assert result["tied"] == [{"name": HEAD, "tied_to": "transformer.wte.weight"}]


def test_an_untied_model_still_needs_its_head(llama_folder: Path) -> None:
    """The same file against the same architecture untied: the head is really missing."""
    result = _check(llama_folder, tie_word_embeddings=False)
    assert not result.ok and result.missing == [HEAD] and result.tied == []


def test_tied_names_with_different_values_do_not_fit(
    run_cli, llama_folder: Path, tmp_path: Path
) -> None:
    embed = load_file(llama_folder / "model.safetensors")[EMBED]
    folder = _copy_with_head(llama_folder, tmp_path / "both", embed + 0.01)
    assert {EMBED, HEAD} <= set(_names(folder / "model.safetensors"))
    proc = run_cli("check", folder, *LLAMA_TARGET)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stdout.splitlines() if "different values" in ln]
    assert f"{EMBED}, {HEAD}" in line
    result = _check(folder)
    assert result.tied_conflict == [(EMBED, HEAD)] and not result.missing
    assert result.to_dict()["tied_conflict"] == [[EMBED, HEAD]]
    # apply refuses it the same way: exit 1, one message naming both, nothing written
    rules = tmp_path / "rules.yaml"
    model = {"model": "transformers:LlamaForCausalLM", "kwargs": LLAMA}
    doc = {"source": str(folder), "target": model, "output": "out", "rules": []}
    rules.write_text(yaml.safe_dump(doc))
    applied = run_cli("apply", rules)
    assert_clean_failure(applied, 1, "different values", f"{EMBED}, {HEAD}")
    assert not (tmp_path / "out").exists()


def test_tied_names_with_equal_values_fit(run_cli, llama_folder: Path, tmp_path: Path) -> None:
    embed = load_file(llama_folder / "model.safetensors")[EMBED]
    folder = _copy_with_head(llama_folder, tmp_path / "both", embed.clone())
    assert {EMBED, HEAD} <= set(_names(folder / "model.safetensors"))
    proc = run_cli("check", folder, *LLAMA_TARGET, "--json")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    result = json.loads(proc.stdout)
    assert result["tied"] == [] and result["tied_conflict"] == []


def test_a_torch_file_of_a_tied_state_dict_fits(llama: torch.nn.Module, tmp_path: Path) -> None:
    """torch.save keeps both names, on one storage."""
    path = tmp_path / "tied.pt"
    torch.save(llama.state_dict(), path)
    result = _check(path)
    assert result.ok and result.tied == [] and result.tied_conflict == []
    wrong = {**llama.state_dict(), HEAD: llama.lm_head.weight.detach() * 2}
    torch.save(wrong, tmp_path / "wrong.pt")
    assert _check(tmp_path / "wrong.pt").tied_conflict == [(EMBED, HEAD)]


def test_a_tied_folder_is_a_verify_reference(run_cli, llama_folder: Path, tmp_path: Path) -> None:
    model = {"model": "transformers:LlamaForCausalLM", "kwargs": LLAMA}
    doc = {
        "version": 1,
        "source": str(llama_folder),
        "target": model,
        "output": "out",
        "rules": [{"op": "cast", "dtype": "float32"}],
        "verify": {"reference": model, "inputs": INPUTS},
    }
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = run_cli("apply", rules, "--json")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    report = json.loads(proc.stdout)
    assert report["check"]["ok"] and report["check"]["tied"] == [{"name": HEAD, "tied_to": EMBED}]
    assert report["verify"]["ok"] and report["verify"]["compared"]
    assert HEAD not in _names(tmp_path / "out" / "model.safetensors")


def test_diff_suggest_proposes_no_fill_for_a_tied_name(run_cli, llama_folder: Path) -> None:
    proc = run_cli("diff", llama_folder, *LLAMA_TARGET, "--suggest", "--json")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    report = json.loads(proc.stdout)
    assert report["reconciled"] and report["only_in_b"] == []
    assert report["tied_in_b"] == [{"name": HEAD, "tied_to": EMBED}]
    assert not any(f["rule"] for f in report["findings"]), report["findings"]
    rules = yaml.safe_load(report["rules_file"])["rules"]
    assert rules == [] and "fill_missing" not in report["rules_file"]
    text = ckptsurgeon.diff(llama_folder, target=LLAMA_TARGET[1], kwargs=LLAMA).report.text()
    assert f"tied in B, absent from A (1): {HEAD} (shares {EMBED})" in "\n".join(text)


def test_load_into_a_tied_model(llama: torch.nn.Module, llama_folder: Path) -> None:
    torch.manual_seed(1)
    fresh = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        want = llama(ids).logits
        assert not torch.allclose(fresh(ids).logits, want)  # the premise: other weights
        result = ckptsurgeon.load_into(fresh, llama_folder / "model.safetensors")
        assert not result.missing_keys and not result.unexpected_keys
        assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied
        torch.testing.assert_close(fresh(ids).logits, want, rtol=0, atol=0)


def test_load_into_a_tied_meta_model_with_assign(
    llama: torch.nn.Module, llama_folder: Path
) -> None:
    with torch.device("meta"):
        empty = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    ckptsurgeon.load_into(empty, llama_folder / "model.safetensors", assign=True)
    assert not empty.lm_head.weight.is_meta
    assert empty.lm_head.weight is empty.model.embed_tokens.weight  # the tie kept
    assert torch.equal(empty.lm_head.weight, llama.lm_head.weight)
