"""Verification: results that load strictly but compute something else are caught (exit 4,
nothing written) and the first module responsible is named; faithful conversions pass.

Real transformers BERT models saved with ``save_pretrained``, converted through the CLI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, TINY_BERT, assert_clean_failure
from safetensors.torch import load_file, save_file

import ckptsurgeon

transformers = pytest.importorskip("transformers")

BERT = TINY_BERT
BERT_INPUTS = [{"name": "input_ids", "shape": [2, 8], "dtype": "int64", "high": 100}]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BERT encoder saved by transformers itself (model.safetensors + config.json)."""
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**BERT))
    for module in model.modules():  # as a trained model's: attention far from uniform
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.2)
            torch.nn.init.normal_(module.bias, 0.0, 0.2)
        elif isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, 0.0, 0.3)
    folder = tmp_path_factory.mktemp("bert") / "bert"
    model.save_pretrained(folder)
    return folder


def write_rules(folder: Path, source: Path, rules: list[dict], **verify: Any) -> Path:
    doc = {
        "version": 1,
        "source": str(source),
        "target": {"model": "transformers:BertModel", "kwargs": BERT},
        "output": "out.safetensors",
        "rules": rules,
        "verify": {
            "reference": {"model": "transformers:BertModel", "kwargs": BERT},
            "inputs": BERT_INPUTS,
            **verify,
        },
    }
    path = folder / "rules.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_a_faithful_conversion_passes_and_reports(run_cli, bert_folder: Path, tmp_path: Path):
    rules = write_rules(tmp_path, bert_folder, [])
    proc = run_cli("apply", rules, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)["verify"]
    assert report["ok"] and report["first_divergence"] is None
    assert report["compared"][0]["max_abs_err"] == 0.0
    assert (report["atol"], report["rtol"]) == (1e-5, 1e-4)  # float32 defaults
    assert (tmp_path / "out.safetensors").exists()
    # The written output verifies on its own too, from the CLI and from Python.
    again = run_cli("verify", rules)
    assert again.returncode == 0 and "computes what the source computed" in again.stdout
    assert ckptsurgeon.verify(rules)["ok"]


def test_a_transposed_square_weight_is_caught_and_named(run_cli, bert_folder: Path, tmp_path: Path):
    """Loads strictly (32 x 32 either way), computes something else."""
    query = "encoder.layer.0.attention.self.query"
    rules = write_rules(
        tmp_path, bert_folder, [{"op": "transpose", "pattern": f"^{query}.weight$"}]
    )
    assert run_cli("apply", rules, "--dry-run").returncode == 0  # the shape check passes
    proc = run_cli("apply", rules, "--json")
    assert_clean_failure(proc, 4, "verification failed", f"first module to diverge: {query}:")
    report = json.loads(proc.stdout)
    assert report["verify"]["first_divergence"]["candidate"] == query
    assert not report["verify"]["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rules.yaml"]  # nothing written


def test_swapped_blocks_are_caught_and_the_swap_named(run_cli, bert_folder: Path, tmp_path: Path):
    swap = [
        {"op": "rename", "pattern": r"^encoder\.layer\.0\.", "replace": "encoder.layer.X."},
        {"op": "rename", "pattern": r"^encoder\.layer\.1\.", "replace": "encoder.layer.0."},
        {"op": "rename", "pattern": r"^encoder\.layer\.X\.", "replace": "encoder.layer.1."},
    ]
    proc = run_cli("apply", write_rules(tmp_path, bert_folder, swap), "--json")
    assert_clean_failure(proc, 4, "encoder.layer.0 (reference: encoder.layer.1)")
    first = json.loads(proc.stdout)["verify"]["first_divergence"]
    assert (first["candidate"], first["reference"]) == ("encoder.layer.0", "encoder.layer.1")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_layernorm_scaled_by_one_percent_is_caught_in_a_written_output(
    run_cli, bert_folder: Path, tmp_path: Path
):
    rules = write_rules(tmp_path, bert_folder, [])
    assert run_cli("apply", rules).returncode == 0
    out = tmp_path / "out.safetensors"
    tensors = load_file(out)
    norm = "encoder.layer.1.output.LayerNorm"
    tensors[f"{norm}.weight"] = tensors[f"{norm}.weight"] * 1.01
    save_file(tensors, out)
    proc = run_cli("verify", rules, "--json")
    assert proc.returncode == 4, proc.stderr
    result = json.loads(proc.stdout)
    assert result["first_divergence"]["candidate"] == norm
    assert not ckptsurgeon.verify(rules)["ok"]


def test_named_module_pairs_leave_a_new_head_out(run_cli, bert_folder: Path, tmp_path: Path):
    """BERT into a classifier with a new head: the encoder's output must agree; comparing
    the logits instead fails, naming the re-initialised head as expected to differ."""
    cls = {**BERT, "num_labels": 3}
    doc = {
        "version": 1,
        "source": str(bert_folder),
        "target": {"model": "transformers:BertForSequenceClassification", "kwargs": cls},
        "output": "out",
        "rules": [
            {"op": "add_prefix", "prefix": "bert."},
            {"op": "fill_missing", "pattern": "^classifier\\."},
        ],
        "verify": {
            "reference": {"model": "transformers:BertModel", "kwargs": BERT},
            "inputs": BERT_INPUTS,
            "compare": [{"reference": "encoder", "candidate": "bert.encoder"}],
        },
    }
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = run_cli("apply", rules, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verify"]["compared"][0]["candidate"] == "bert.encoder"
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("verify", "code", "needle"),
    [
        ({"inputs": BERT_INPUTS}, 2, "verify.reference"),  # no reference model
        ({"reference": {"model": "transformers:BertModel", "kwargs": BERT}}, 2, "exactly one"),
        (
            {
                "reference": {"model": "transformers:BertModel", "kwargs": BERT},
                "inputs": BERT_INPUTS,
                "compare": [{"reference": "encoder", "candidate": "no.such.module"}],
            },
            2,
            "no module or method 'no.such.module'",
        ),
        (
            {
                "reference": {"model": "transformers:BertModel", "kwargs": BERT},
                "inputs": [{"shape": [2, 3, 8, 8]}],  # an image into a text model
            },
            2,
            "the reference model raised",
        ),
        (
            {
                "reference": {"model": "transformers:BertModel", "kwargs": BERT},
                "inputs": [{"name": "input_ids", "shape": [2, 8], "dtype": "int64"}],
            },
            2,
            "needs high",
        ),
        (
            {"reference": {"model": "no_such_package.models:Net"}, "inputs": BERT_INPUTS},
            2,
            "cannot import no_such_package.models",
        ),
    ],
)
def test_bad_verify_sections_are_one_line_usage_errors(
    run_cli, bert_folder: Path, tmp_path: Path, verify: dict, code: int, needle: str
):
    rules = write_rules(tmp_path, bert_folder, [])
    doc = yaml.safe_load(rules.read_text())
    doc["verify"] = verify
    rules.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert_clean_failure(run_cli("apply", rules), code, needle)
    assert not (tmp_path / "out.safetensors").exists()


def test_verify_needs_a_target_model(run_cli, bert_folder: Path, tmp_path: Path):
    rules = write_rules(tmp_path, bert_folder, [])
    doc = yaml.safe_load(rules.read_text())
    doc["target"] = {"checkpoint": str(bert_folder)}
    rules.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert_clean_failure(run_cli("validate", rules), 2, "rules.yaml:", "needs target.model")


def test_verify_without_an_output_yet_says_to_apply_first(
    run_cli, bert_folder: Path, tmp_path: Path
):
    rules = write_rules(tmp_path, bert_folder, [])
    assert_clean_failure(run_cli("verify", rules), 2, "run apply first")


# -- the Meta-layout Llama example (rules/meta_llama_to_hf.yaml) ---------------------------

LLAMA_RULES = REPO / "rules" / "meta_llama_to_hf.yaml"


@pytest.fixture(scope="module")
def meta_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(REPO / "examples"))
    import make_checkpoints

    return make_checkpoints.meta_llama(tmp_path_factory.mktemp("llama"))


def test_the_llama_example_verifies_with_permute_rope(run_cli, meta_llama: Path, tmp_path: Path):
    out = tmp_path / "llama_hf"
    proc = run_cli("apply", LLAMA_RULES, "--source", meta_llama, "--output", out, "--json")
    assert proc.returncode == 0, proc.stderr
    output = json.loads(proc.stdout)["verify"]["compared"][0]
    assert output["ok"] and output["top1_agreement"] == 1.0 and output["max_abs_err"] < 1e-5
    assert (out / "model.safetensors").exists()


def test_the_llama_example_without_permute_rope_fails_at_the_attention(
    run_cli, meta_llama: Path, tmp_path: Path
):
    doc = yaml.safe_load(LLAMA_RULES.read_text())
    doc["rules"] = [r for r in doc["rules"] if r["op"] != "permute_rope"]
    for section in (doc["target"], doc["verify"]["reference"]):
        section["model"] = (
            str(REPO / "examples" / "meta_llama.py") + ":" + section["model"].split(":")[1]
        )
    rules = tmp_path / "no_permute.yaml"
    rules.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "llama_hf"
    proc = run_cli("apply", rules, "--source", meta_llama, "--output", out)
    assert_clean_failure(
        proc, 4, "first module to diverge: model.layers.0.self_attn (reference: layers.0.attention)"
    )
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [rules]  # no temporary left behind either


# -- diff --suggest --verify -------------------------------------------------------------

WRAPPED = """
import torch, torchvision

class Wrapped(torch.nn.Module):
    def __init__(self, squash: bool = False):
        super().__init__()
        self.backbone = torchvision.models.resnet18(num_classes=10)
        self.squash = squash

    def forward(self, x):
        out = self.backbone(x)
        return out.sigmoid() if self.squash else out
"""


def test_diff_suggest_verify_prints_a_verify_section_that_passes(run_cli, tmp_path: Path):
    (tmp_path / "wrapped.py").write_text(WRAPPED)
    sys.path.insert(0, str(tmp_path))
    import wrapped

    torch.manual_seed(0)
    torch.save(wrapped.Wrapped().state_dict(), tmp_path / "wrapped.pth")
    args = ["diff", tmp_path / "wrapped.pth", "--target", "torchvision.models:resnet18"]
    args += ["--kwargs", '{"num_classes": 10}', "--suggest", "--verify"]
    proc = run_cli(*args, "--reference", f"{tmp_path / 'wrapped.py'}:Wrapped")
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load(proc.stdout)
    assert doc["verify"]["inputs"] == [{"shape": [2, 3, 64, 64]}]  # guessed from conv1
    assert "the result computes what A computes" in proc.stderr
    # The printed file runs as is once it has an output, verification included.
    doc["output"] = str(tmp_path / "out.safetensors")
    rules = tmp_path / "suggested.yaml"
    rules.write_text(yaml.safe_dump(doc, sort_keys=False))
    applied = run_cli("apply", rules, "--json")
    assert applied.returncode == 0 and json.loads(applied.stdout)["verify"]["ok"]

    # A reference that computes something else: no verify section is printed, exit 4.
    squash = run_cli(
        *args, "--reference", f"{tmp_path / 'wrapped.py'}:Wrapped", "--reference-kwargs",
        '{"squash": true}',
    )  # fmt: skip
    assert squash.returncode == 4, squash.stderr
    assert "verify" not in yaml.safe_load(squash.stdout)
    assert "does NOT compute" in squash.stderr and "(the whole model)" in squash.stderr


def test_recorded_inputs_from_a_file(run_cli, bert_folder: Path, tmp_path: Path):
    """``file:`` instead of seeded inputs: its tensors are the keyword arguments."""
    ids = torch.randint(0, 100, (3, 5))
    save_file({"input_ids": ids, "attention_mask": torch.ones(3, 5, dtype=torch.int64)},
              tmp_path / "inputs.safetensors")  # fmt: skip
    rules = write_rules(tmp_path, bert_folder, [])
    doc = yaml.safe_load(rules.read_text())
    doc["verify"].pop("inputs")
    doc["verify"]["file"] = "inputs.safetensors"  # relative to the rules file
    rules.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = run_cli("apply", rules, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verify"]["ok"]
