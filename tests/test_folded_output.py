"""`apply` and `inspect` print keys folded by layer index; `--verbose` / `--all` list every one.

Through the real CLI, on checkpoints saved by the real libraries (torchvision under
DataParallel, transformers' LlamaForCausalLM).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from ckptsurgeon.reporting.fold import fold_rows

sys.path.insert(0, str(REPO / "examples"))
import make_checkpoints as make

LAYERS = 4


def _lines(text: str) -> list[str]:
    return text.rstrip("\n").splitlines()


def _counts_line(lines: list[str]) -> int:
    return next(i for i, line in enumerate(lines) if line.startswith("source keys: "))


def _table(text: str) -> list[str]:
    """The plan's key rows: after the source/target lines, before dropped, hint and counts."""
    lines = _lines(text)[: _counts_line(_lines(text))]
    return [ln for ln in lines if not ln.startswith(("source: ", "target: ", "dropped ", "("))]


def test_resnet18_plan_is_folded_and_verbose_lists_every_key(tmp_path: Path, run_cli) -> None:
    src = make.resnet18_dp(tmp_path)
    args = (
        "apply",
        REPO / "rules" / "dataparallel_new_head.yaml",
        "--source",
        src,
        "--output",
        tmp_path / "out.safetensors",
        "--dry-run",
    )
    folded, verbose, as_json = run_cli(*args), run_cli(*args, "--verbose"), run_cli(*args, "--json")
    for proc in (folded, verbose, as_json):
        assert proc.returncode == 0, proc.stderr
    short, full = _lines(folded.stdout), _lines(verbose.stdout)
    assert len(short) < len(full) - 40, (len(short), len(full))

    # Both end with the same counts lines and verdict.
    tail_short, tail_full = short[_counts_line(short) :], full[_counts_line(full) :]
    assert tail_short == tail_full
    assert tail_short[0] == "source keys: 122, output keys: 122 (44.77 MB), dropped: 0"
    assert tail_short[1] == "output keys by action: stripped 120, reinit 2"
    assert "loads strictly" in tail_short[2]

    # --verbose: today's table, one line per key, each naming its source.
    keys = json.loads(as_json.stdout)["keys"]
    assert len(keys) == 122
    for key in keys:
        if key["name"].startswith("fc."):
            continue
        (line,) = [ln for ln in full if ln.split()[0] == key["name"]]
        assert line.split()[-2:] == ["<-", "module." + key["name"]]
    assert re.search(
        r"^fc\.weight +\(10, 512\) +float32 +reinit \(checkpoint had", verbose.stdout, re.M
    )

    # Folded: the one prefix strip is one line, the new head's rows follow.
    assert "stripped 'module.' from 120 keys: conv1.weight, bn1.*, layer{1..4}.*" in short
    assert re.search(
        r"^fc\.weight +\(10, 512\) +float32 +reinit \(checkpoint had", folded.stdout, re.M
    )
    assert "122 output keys in 3 rows" in folded.stdout
    assert "--verbose lists every key" in folded.stdout
    # The lines account for every key exactly once.
    counted = 0
    for line in _table(folded.stdout):
        count = re.search(r"  x(\d+)  ", line) or re.search(r" (\d+) keys: ", line)
        counted += int(count.group(1)) if count else 1
    assert counted == 122


def test_rows_that_differ_fold_by_layer_index(tmp_path: Path, run_cli) -> None:
    """Keys renamed one by one (not one prefix for all) get rows, folded by layer index."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nrules:\n  - {op: strip_prefix, prefix: module.}\n"
        r"  - {op: rename, pattern: '^layer(\d)\.(\d)\.conv(\d)\.', replace: 'layer\1.\2.c\3.'}"
        "\n"
    )
    src = make.resnet18_dp(tmp_path)
    proc = run_cli("apply", rules, "--source", src, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    # The keys the strip alone touched: one line, patterns naming exactly them.
    assert (
        "stripped 'module.' from 106 keys: conv1.weight, bn1.*, layer{1..4}.{0..1}.bn{1..2}.*, "
        "layer{2..4}.0.downsample.*, fc.*\n" in proc.stdout
    ), proc.stdout
    # Both blocks of a stage on one row, with a count; their sources fold too.
    assert re.search(
        r"^layer1\.\{0\.\.1\}\.c1\.weight +\(64, 64, 3, 3\) +float32 +x2 +stripped; renamed"
        r" +<- module\.layer1\.\{0\.\.1\}\.conv1\.weight$",
        proc.stdout,
        re.M,
    ), proc.stdout
    # Different shapes never share a row: layer2.0.conv1 takes 64 channels, layer2.1.conv1 128.
    assert re.search(r"^layer2\.0\.c1\.weight +\(128, 64, 3, 3\) ", proc.stdout, re.M)
    assert re.search(r"^layer2\.1\.c1\.weight +\(128, 128, 3, 3\) ", proc.stdout, re.M)
    assert "122 output keys in 12 rows" in proc.stdout


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny transformers LlamaForCausalLM with 4 layers (with attention biases: 55 tensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=True,
        tie_word_embeddings=False,
    )
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder / "model.safetensors"


def _rules(tmp_path: Path, *first: str) -> Path:
    """The rules ``first``, then HF Llama names -> Meta's (``layers.N.attention.wq``)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nsource: src.safetensors\noutput: out.safetensors\nrules:\n"
        + "".join(f"  {rule}\n" for rule in first)
        + r"  - {op: rename, pattern: '^model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.',"
        + r" replace: 'layers.\1.attention.w\2.'}"
        + "\n"
        + r"  - {op: rename, pattern: '^model\.layers\.(\d+)\.mlp\.gate_proj\.',"
        + r" replace: 'layers.\1.feed_forward.w1.'}"
        + "\n"
    )
    return rules


def test_llama_renames_fold_into_layer_ranges(tmp_path: Path, llama: Path, run_cli) -> None:
    args = ("apply", _rules(tmp_path), "--source", llama, "--dry-run")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert re.search(
        r"^layers\.\{0\.\.3\}\.attention\.wq\.weight +\(32, 32\) +float32 +x4 +renamed"
        r" +<- model\.layers\.\{0\.\.3\}\.self_attn\.q_proj\.weight$",
        proc.stdout,
        re.M,
    ), proc.stdout
    assert re.search(
        r"^layers\.\{0\.\.3\}\.attention\.wk\.bias +\(16,\) +float32 +x4 +renamed",
        proc.stdout,
        re.M,
    )
    assert re.search(
        r"^layers\.\{0\.\.3\}\.feed_forward\.w1\.weight +\(48, 32\) ", proc.stdout, re.M
    )
    # Kept keys: one line, its patterns naming exactly them among the output keys (the
    # renamed ones left model.* for layers.*).
    assert "kept 19 keys: lm_head.weight, model.*" in _lines(proc.stdout), proc.stdout
    assert len(_table(proc.stdout)) == 1 + 9  # kept; 9 renamed tensors per layer
    assert "55 output keys in 10 rows" in proc.stdout

    verbose = run_cli(*args, "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert "{" not in verbose.stdout
    for i in range(LAYERS):
        assert re.search(
            rf"^layers\.{i}\.attention\.wq\.weight +\(32, 32\) +float32 +renamed"
            rf" +<- model\.layers\.{i}\.self_attn\.q_proj\.weight$",
            verbose.stdout,
            re.M,
        )
    # --json is unchanged: every key.
    data = json.loads(run_cli(*args, "--json").stdout)
    assert len(data["keys"]) == 55
    assert "layers.2.attention.wv.bias" in {k["name"] for k in data["keys"]}


def test_non_contiguous_layers_fold_as_a_list(tmp_path: Path, llama: Path, run_cli) -> None:
    rules = _rules(tmp_path, r"- {op: drop, pattern: '^model\.layers\.[13]\.'}")
    proc = run_cli("apply", rules, "--source", llama, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert re.search(
        r"^layers\.\{0,2\}\.attention\.wo\.weight +\(32, 32\) +float32 +x2 +renamed"
        r" +<- model\.layers\.\{0,2\}\.self_attn\.o_proj\.weight$",
        proc.stdout,
        re.M,
    ), proc.stdout
    # Dropped keys: one line per reason, the pattern naming exactly the keys dropped.
    dropped = [ln for ln in _lines(proc.stdout) if ln.startswith("dropped ")]
    assert dropped == [
        r"dropped 26 keys: model.layers.{1,3}.*  (rules[0] (drop): matches '^model\.layers\.[13]\.')"
    ], dropped
    assert "55 output keys + 26 dropped" not in proc.stdout  # 29 are written, 26 dropped
    assert "29 output keys + 26 dropped in " in proc.stdout
    assert "dropped: 26" in proc.stdout
    verbose = run_cli("apply", rules, "--source", llama, "--dry-run", "--verbose")
    assert len([ln for ln in _lines(verbose.stdout) if ln.startswith("dropped ")]) == 26


def test_inspect_folds_past_a_screenful_and_all_lists_every_name(llama: Path, run_cli) -> None:
    folded, every = run_cli("inspect", llama), run_cli("inspect", llama, "--all")
    assert folded.returncode == 0 and every.returncode == 0, (folded.stderr, every.stderr)
    assert re.search(
        r"^model\.layers\.\{0\.\.3\}\.self_attn\.q_proj\.weight +\(32, 32\) +float32 +x4 +16\.38 KB$",
        folded.stdout,
        re.M,
    ), folded.stdout  # 4 x 32 x 32 x 4 bytes
    assert "55 tensors in 16 rows" in folded.stdout and "--all lists every name" in folded.stdout
    assert "model.layers.2.self_attn.q_proj.weight" not in folded.stdout
    for i in range(LAYERS):
        assert re.search(
            rf"^model\.layers\.{i}\.self_attn\.q_proj\.weight +\(32, 32\) +float32 +4\.10 KB$",
            every.stdout,
            re.M,
        )
    assert "{" not in every.stdout.split("prefixes")[0]
    # The totals and the prefix tree are the same either way.
    assert folded.stdout.split("\n55 tensors")[1] == every.stdout.split("\n55 tensors")[1]
    # --json unchanged: every name.
    assert len(json.loads(run_cli("inspect", llama, "--json").stdout)["tensors"]) == 55


def test_inspect_of_a_small_checkpoint_lists_every_name(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "small.pt"
    torch.save({f"blocks.{i}.weight": torch.zeros(2) for i in range(3)}, path)
    proc = run_cli("inspect", path)
    assert proc.returncode == 0, proc.stderr
    assert all(f"blocks.{i}.weight" in proc.stdout for i in range(3))
    assert "{" not in proc.stdout


def test_fold_rows_is_exact() -> None:
    names = [f"h.{i}.e.{j}.w" for i in range(3) for j in range(8)]
    names += ["h.0.e.0.b", "h.1.e.1.b", "x.01.w", "x.1.w", "a.0.w", "a.2.w", "a.3.w", "a.4.w"]
    rows = fold_rows(names, name=lambda n: n)
    assert [(r.name, r.count) for r in rows] == [
        ("h.{0..2}.e.{0..7}.w", 24),
        # Not a product of {0,1} x {0,1}: two rows, never a pattern naming a key not there.
        ("h.0.e.0.b", 1),
        ("h.1.e.1.b", 1),
        ("x.01.w", 1),  # a leading zero is not an index
        ("x.1.w", 1),
        ("a.{0,2..4}.w", 4),
    ]
    # Sources must fold the same way as the name: a constant offset, or a constant.
    pairs = [(f"o.{i}.w", f"s.{i + 2}.w") for i in range(3)]  # shifted
    pairs += [(f"r.{i}.w", f"s.{2 - i}.w") for i in range(3)]  # reversed: not folded
    pairs += [(f"c.{i}.w", "s.0.w") for i in range(3)]  # one source copied
    rows = fold_rows(pairs, name=lambda p: p[0], sources=lambda p: (p[1],))
    assert [(r.name, r.sources) for r in rows] == [
        ("o.{0..2}.w", ("s.{2..4}.w",)),
        ("r.0.w", ("s.2.w",)),
        ("r.1.w", ("s.1.w",)),
        ("r.2.w", ("s.0.w",)),
        ("c.{0..2}.w", ("s.0.w",)),
    ]
    # Different keys never share a row; rows keep the order of first appearance.
    rows = fold_rows(["l.0.w", "l.1.w", "l.2.w"], name=lambda n: n, key=lambda n: n == "l.1.w")
    assert [r.name for r in rows] == ["l.{0,2}.w", "l.1.w"]
