"""The plan `apply` prints (issue 31): one line per action and name pattern, counts that say
what they count and agree, lines that fit a terminal and are never cut in a pipe, and a
strict check that did not run said so.

Through the real CLI, on checkpoints saved by the real libraries (torchvision under
DataParallel, transformers' BertModel, Meta's Llama layout).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "examples"))
import make_checkpoints as make

RULES = REPO / "rules"
NO_TARGET = "no target: strict check skipped"
FOOTER = re.compile(r"^source keys: (\d+), output keys: (\d+) \([^)]*\), dropped: (\d+)$", re.M)
ACTIONS = re.compile(
    r"^output keys by action: (.*?)(?: \((\d+) keys? ha(?:s|ve) more than one\))?$", re.M
)
HINT = re.compile(r"^\((\d+) output keys(?: \+ (\d+) dropped)? in (\d+) rows, ", re.M)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cli(*args: object, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m ckptsurgeon ARGS``, its output a pipe, with ``env`` on top of a copy of
    this one from which anything that makes rich think it writes to a terminal is gone."""
    base = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    return subprocess.run(
        [sys.executable, "-m", "ckptsurgeon", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**base, **env},
    )


def _plan_lines(stdout: str) -> list[str]:
    """The plan's own lines: not the source, target and dry-run lines (paths)."""
    return [
        ln
        for ln in stdout.splitlines()
        if not ln.startswith(("source: ", "target: ", "dry run: ", "wrote "))
    ]


@pytest.mark.parametrize(
    ("maker", "rules"),
    [
        ("resnet18_dp", "dataparallel_new_head.yaml"),
        ("meta_llama", "meta_llama_to_hf.yaml"),
        ("bert_encoder", "hf_encoder_to_classifier.yaml"),
    ],
)
def test_example_dry_runs_fit_one_screen(tmp_path: Path, run_cli, maker, rules) -> None:
    src = getattr(make, maker)(tmp_path)
    proc = run_cli(
        "apply", RULES / rules, "--source", src, "--output", tmp_path / "out", "--dry-run"
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) < 40, proc.stdout
    if maker != "resnet18_dp":
        return
    # One prefix strip over 120 keys is one line; the new head's two rows are what differs.
    (strip,) = [ln for ln in lines if ln.startswith("stripped ")]
    assert strip.startswith("stripped 'module.' from 120 keys: "), strip
    assert "layer{1..4}.*" in strip
    assert re.search(
        r"^fc\.weight +\(10, 512\) +float32 +reinit \(checkpoint had \[1000, 512\]\)$",
        proc.stdout,
        re.M,
    )
    assert re.search(
        r"^fc\.bias +\(10,\) +float32 +reinit \(checkpoint had \[1000\]\)$", proc.stdout, re.M
    )
    assert "layer3.1.bn2.running_var" not in proc.stdout  # no longer a row per key
    assert "122 output keys in 3 rows" in proc.stdout


def test_verbose_lists_every_key(tmp_path: Path, run_cli) -> None:
    src = make.resnet18_dp(tmp_path)
    args = ("apply", RULES / "dataparallel_new_head.yaml", "--source", src, "--dry-run")
    verbose, as_json = run_cli(*args, "--verbose"), run_cli(*args, "--json")
    assert verbose.returncode == 0 and as_json.returncode == 0, (verbose.stderr, as_json.stderr)
    keys = [k["name"] for k in json.loads(as_json.stdout)["keys"]]
    assert len(keys) == 122
    firsts = [ln.split()[0] for ln in verbose.stdout.splitlines() if ln.strip()]
    for name in keys:
        assert firsts.count(name) == 1, name
    assert "stripped 'module.' from" not in verbose.stdout and "{" not in verbose.stdout


def test_footer_numbers_agree_and_say_what_they_count(tmp_path: Path, run_cli) -> None:
    """Keys dropped and keys filled: source, output and dropped counts differ, and every
    line that counts keys counts the same ones (as the JSON does)."""
    src = make.bert_encoder(tmp_path)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\n"
        "target:\n"
        "  model: transformers:BertForSequenceClassification\n"
        f"  kwargs: {json.dumps({**make.BERT, 'num_labels': 3})}\n"
        "seed: 0\n"
        "rules:\n"
        "  - {op: drop, pattern: '^pooler\\.'}\n"
        "  - {op: add_prefix, prefix: 'bert.'}\n"
        "  - {op: fill_missing, pattern: '^(classifier|bert\\.pooler)\\.'}\n"
    )
    args = ("apply", rules, "--source", src, "--dry-run")
    proc, as_json = run_cli(*args), run_cli(*args, "--json")
    assert proc.returncode == 0 and as_json.returncode == 0, (proc.stderr, as_json.stderr)
    report = json.loads(as_json.stdout)
    n_out, n_dropped = len(report["keys"]), len(report["dropped"])
    assert (n_out, n_dropped) == (41, 2)

    source, output, dropped = map(int, FOOTER.search(proc.stdout).groups())
    assert (source, output, dropped) == (39, n_out, n_dropped), proc.stdout
    hinted_out, hinted_dropped, rows = HINT.search(proc.stdout).groups()
    assert (int(hinted_out), int(hinted_dropped)) == (output, dropped), proc.stdout

    # Per action: output keys, each counted once per action it had (here one each).
    actions, several = ACTIONS.search(proc.stdout).groups()
    per_action = dict(
        (verb, int(n)) for verb, n in (part.rsplit(" ", 1) for part in actions.split(", "))
    )
    assert per_action == {"prefixed": 37, "filled": 4}, proc.stdout
    assert several is None and sum(per_action.values()) == output
    assert "dropped" not in per_action  # dropped keys are not output keys

    # The rows cover the output keys and the dropped ones, each once.
    plan = _plan_lines(proc.stdout)
    table = plan[: next(i for i, ln in enumerate(plan) if HINT.match(ln))]
    assert len(table) == int(rows)
    covered = 0
    for line in table:
        count = re.search(r"  x(\d+)  ", line) or re.search(r" (\d+) keys: ", line)
        covered += int(count.group(1)) if count else 1
    assert covered == output + dropped

    # Keys with several actions are counted under each, and the line says so.
    llama = make.meta_llama(tmp_path)
    meta = run_cli("apply", RULES / "meta_llama_to_hf.yaml", "--source", llama, "--dry-run")
    assert meta.returncode == 0, meta.stderr
    assert (
        "output keys by action: renamed 18, mapped 3, permuted 4 (4 keys have more than one)"
        in meta.stdout
    )


def test_no_target_says_the_strict_check_was_skipped(tmp_path: Path, run_cli) -> None:
    src = make.resnet18_dp(tmp_path)
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\nrules:\n  - {op: strip_prefix, prefix: module.}\n")
    out, report = tmp_path / "out.safetensors", tmp_path / "report.json"
    for extra in (("--dry-run",), ("--output", out, "--report", report)):
        proc = run_cli("apply", rules, "--source", src, *extra)
        assert proc.returncode == 0, proc.stderr
        assert NO_TARGET in proc.stdout.splitlines(), proc.stdout
        assert "check against" not in proc.stdout
    assert out.exists()
    written = json.loads(report.read_text())
    assert written["check"] is None and written["check_skipped"] == NO_TARGET
    dry = json.loads(run_cli("apply", rules, "--source", src, "--dry-run", "--json").stdout)
    assert dry["check"] is None and dry["check_skipped"] == NO_TARGET

    # With a target the check runs: no such line, and the JSON says nothing was skipped.
    args = ("apply", RULES / "dataparallel_new_head.yaml", "--source", src, "--dry-run")
    checked = run_cli(*args)
    assert checked.returncode == 0, checked.stderr
    assert NO_TARGET not in checked.stdout and "loads strictly" in checked.stdout
    data = json.loads(run_cli(*args, "--json").stdout)
    assert data["check"]["ok"] and data["check_skipped"] is None


LONG = "encoder." + ".".join(f"very_long_module_name_number_{i}" for i in range(6)) + ".weight"


@pytest.fixture
def long_names(tmp_path: Path) -> tuple[Path, Path]:
    """A DataParallel checkpoint with a key of 200-odd characters, and rules stripping it."""
    src = tmp_path / "long.pt"
    torch.save({"module." + LONG: torch.zeros(3, 2), "module.head.weight": torch.zeros(2, 2)}, src)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nrules:\n  - {op: strip_prefix, prefix: module.}\n"
        "  - {op: cast, dtype: float16}\n"
    )
    return src, rules


def test_piped_output_is_never_cut(long_names: tuple[Path, Path]) -> None:
    src, rules = long_names
    for args in (("--dry-run",), ("--dry-run", "--verbose")):
        # A narrow COLUMNS is the terminal's width, not a pipe's: nothing is cut or wrapped.
        proc = cli("apply", rules, "--source", src, *args, COLUMNS="50")
        assert proc.returncode == 0, proc.stderr
        (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith(LONG)]
        assert re.fullmatch(
            rf"{re.escape(LONG)} +\(3, 2\) +float16 +stripped; cast to float16 +<- module\.{re.escape(LONG)}",
            line,
        ), line
        assert "…" not in proc.stdout


def test_terminal_output_fits_its_width_and_keeps_the_action(long_names: tuple[Path, Path]) -> None:
    src, rules = long_names
    for args in (("--dry-run",), ("--dry-run", "--verbose")):
        proc = cli(
            "apply", rules, "--source", src, *args, TTY_COMPATIBLE="1", NO_COLOR="1", COLUMNS="80"
        )
        assert proc.returncode == 0, proc.stderr
        lines = _plan_lines(ANSI.sub("", proc.stdout))
        assert all(len(ln) <= 80 for ln in lines), "\n".join(lines)
        # The long name, shortened in the middle (its start and its end kept), with its
        # action whole; the short one untouched.
        (row,) = [ln for ln in lines if ln.startswith("encoder.")]
        head, tail = row.split()[0].split("…")
        assert LONG.startswith(head) and LONG.endswith(tail) and len(head + tail) < len(LONG)
        assert "stripped; cast to float16" in row
        assert any(
            re.match(r"head\.weight +\(2, 2\) +float16 +stripped; cast to float16", ln)
            for ln in lines
        )
        # Its source follows, on the row or the next line, shortened the same way.
        origin = lines[lines.index(row) + 1] if "<- " not in row else row
        head, tail = origin.split("<- ")[1].split("…")
        source = "module." + LONG
        assert source.startswith(head) and source.endswith(tail), lines
