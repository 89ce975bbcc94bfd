"""Folder outputs that load: config, tokenizer and preprocessor files carried along, a
transformers target's own config.json, ``from_pretrained(output)`` with nothing missing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_BERT, assert_clean_failure

transformers = pytest.importorskip("transformers")

BERT = TINY_BERT
TOKENIZER_FILES = {
    "vocab.txt": "[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\nworld\n",
    "tokenizer_config.json": json.dumps({"do_lower_case": True}),
    "special_tokens_map.json": json.dumps({"unk_token": "[UNK]"}),
}


@pytest.fixture
def bert_folder(tmp_path: Path) -> Path:
    """A BERT encoder saved by transformers, with its tokenizer files beside it."""
    torch.manual_seed(0)
    folder = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(**BERT)).save_pretrained(folder)
    for name, text in TOKENIZER_FILES.items():
        (folder / name).write_text(text)
    return folder


def classifier_rules(folder: Path, source: Path, **output) -> Path:
    doc = {
        "source": str(source),
        "target": {
            "model": "transformers:BertForSequenceClassification",
            "kwargs": {**BERT, "num_labels": 3},
        },
        "output": {"path": str(folder / "out"), **output},
        "rules": [
            {"op": "add_prefix", "prefix": "bert."},
            {"op": "fill_missing", "pattern": r"^classifier\."},
        ],
    }
    path = folder / "rules.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_a_folder_output_loads_with_from_pretrained(run_cli, bert_folder: Path, tmp_path: Path):
    proc = run_cli("apply", classifier_rules(tmp_path, bert_folder), "--json")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors", *TOKENIZER_FILES])
    written = json.loads(proc.stdout)["written"]["files"]
    assert str(out / "vocab.txt") in written and str(out / "config.json") in written
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert len(config["id2label"]) == 3  # num_labels, as transformers stores it

    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("hello") == 4
    # The encoder computes what the source computed.
    source = transformers.BertModel.from_pretrained(bert_folder).eval()
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval().bert(ids).last_hidden_state, source(ids).last_hidden_state
        )
    # Replacing the earlier output (weights, config, tokenizer files) is allowed ...
    assert run_cli("apply", classifier_rules(tmp_path, bert_folder)).returncode == 0
    # ... a folder holding anything else is still refused.
    (out / "notes.txt").write_text("mine")
    assert_clean_failure(run_cli("apply", tmp_path / "rules.yaml"), 2, "notes.txt")


def test_copy_extras_false_writes_the_weights_only(run_cli, bert_folder: Path, tmp_path: Path):
    rules = classifier_rules(tmp_path, bert_folder, copy_extras=False)
    assert run_cli("apply", rules).returncode == 0
    assert os.listdir(tmp_path / "out") == ["model.safetensors"]


def test_a_link_out_of_the_source_folder_is_refused(run_cli, bert_folder: Path, tmp_path: Path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (bert_folder / "vocab.txt").unlink()
    (bert_folder / "vocab.txt").symlink_to(secret)
    proc = run_cli("apply", classifier_rules(tmp_path, bert_folder))
    assert_clean_failure(proc, 3, "vocab.txt", "links outside")
    assert not (tmp_path / "out").exists()
