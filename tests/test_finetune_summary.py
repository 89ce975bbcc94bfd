"""Where a fine-tune put things: the lines a run ends with, summary.json's paths (real,
absolute, no ``..``), the ``--json`` result carrying the same paths, and ``-q``."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import save_file

from ckptsurgeon.finetune.artifacts import best_epoch, closing_lines
from ckptsurgeon.finetune.runner import run_finetune
from ckptsurgeon.rules.finetune import FinetuneSpec

sys.path.insert(0, str(REPO / "rules"))
from models import digits_cnn

LABELS = ("best", "last", "summary", "curves")
# "  best:    /path/best.safetensors (epoch 2, val_acc 0.7500)"
LINE = re.compile(r"^  (best|last|summary|curves): +(.+?)(?: \(epoch (\d+), (\w+) ([\d.]+)\))?$")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's folder: data and starting weights at the top, the rules file in ``rules/``
    writing to ``rules/../out/./run`` (as the bundled example's ``../examples/out/...``)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 8, 8, generator=gen)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    save_file({"x": x[:32].contiguous(), "y": y[:32].contiguous()}, tmp_path / "train.safetensors")
    save_file({"x": x[32:].contiguous(), "y": y[32:].contiguous()}, tmp_path / "val.safetensors")
    torch.manual_seed(0)
    torch.save({"model": digits_cnn(2).state_dict()}, tmp_path / "init.pt")
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "ft.yaml").write_text(f"""\
version: 1
source: {{path: ../init.pt, key: model}}
target: {{model: {REPO / "rules" / "models.py"}:digits_cnn, kwargs: {{num_classes: 2}}}}
output: ../out/init.safetensors
rules: []
finetune:
  data: {{train: {{tensors: ../train.safetensors}}, val: {{tensors: ../val.safetensors}}}}
  freeze: {{modules: [features], except: ['^fc\\.']}}
  phases:
    - {{epochs: 2, frozen: true, lr: 0.05}}
    - {{epochs: 1, frozen: false, lr: 0.01}}
  batch_size: 16
  output_dir: ../out/./run
""")
    return tmp_path


def closing_block(text: str, trained: bool = True) -> dict[str, re.Match[str]]:
    """The closing block: the output's last lines, right after the last epoch line (when
    the run ``trained``)."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("fine-tune finished: "))
    if trained:
        assert re.match(r"epoch \d+: ", lines[start - 1]), text
    matches = [LINE.match(line) for line in lines[start + 1 :]]
    assert all(matches) and len(matches) == 4, text
    return {m.group(1): m for m in matches if m}


def assert_resolved(path: str) -> None:
    assert os.path.isabs(path), path
    assert ".." not in Path(path).parts and "." not in Path(path).parts, path
    assert path == os.path.realpath(path), path


def check_run(output: str, run_dir: Path, trained: bool = True) -> dict:
    """The closing lines name the files summary.json records, which exist under
    ``run_dir``'s real path; best's epoch and score are summary.json's."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["output_dir"] == os.path.realpath(run_dir)
    assert_resolved(summary["output_dir"])
    for key, path in summary["files"].items():
        assert path is not None, key  # matplotlib is a test dependency: curves too
        assert_resolved(path)
        assert Path(path).is_file() and Path(path).parent == Path(summary["output_dir"]), path
    block = closing_block(output, trained)
    for key in LABELS:
        assert block[key].group(2) == summary["files"][key], (key, output)
    best, last = block["best"], block["last"]
    assert int(best.group(3)) == summary["best"]["epoch"]
    assert best.group(4) == summary["best"]["metric"] == "val_acc"
    assert float(best.group(5)) == round(summary["best"]["value"], 4)
    assert summary["best"]["value"] == summary["best_score"]
    # the epoch the runner wrote best.safetensors at: the first with the highest val_acc
    metrics = [json.loads(m) for m in (run_dir / "metrics.jsonl").read_text().splitlines()]
    top = max(m["val_acc"] for m in metrics)
    assert summary["best"]["epoch"] == next(m["epoch"] for m in metrics if m["val_acc"] == top)
    assert int(last.group(3)) == summary["epochs"] == 3
    return summary


def test_apply_ends_by_saying_where_every_file_went(project: Path, run_cli) -> None:
    proc = run_cli("apply", project / "rules" / "ft.yaml")
    assert proc.returncode == 0, proc.stderr
    check_run(proc.stdout, project / "out" / "run")


def test_apply_json_result_carries_the_same_paths(project: Path, run_cli) -> None:
    proc = run_cli("apply", project / "rules" / "ft.yaml", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = check_run(proc.stderr, project / "out" / "run")  # lines beside JSON: stderr
    result = json.loads(proc.stdout)["finetune"]
    assert result["files"] == summary["files"] and result["best"] == summary["best"]
    assert result["output_dir"] == summary["output_dir"]


def test_quiet_prints_nothing_and_a_finished_run_resumed_repeats_where(
    project: Path, run_cli
) -> None:
    rules = project / "rules" / "ft.yaml"
    proc = run_cli("apply", rules, "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert (project / "out" / "run" / "best.safetensors").is_file()
    # --resume of the finished run: nothing left to train; -q says nothing, without it
    # the run says where its files are, as when it finished
    proc = run_cli("finetune", rules, "--resume", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    proc = run_cli("finetune", rules, "--resume")
    assert proc.returncode == 0, proc.stderr
    check_run(proc.stdout, project / "out" / "run", trained=False)
    assert "fine-tune finished: 3 epochs" in proc.stdout and "\nepoch " not in proc.stdout


def _spec(**overrides) -> FinetuneSpec:
    return FinetuneSpec.model_validate(
        {
            "data": {
                "train": {"tensors": "../train.safetensors"},
                "val": {"tensors": "../val.safetensors"},
            },
            "freeze": {"modules": ["features"], "except": ["^fc\\."]},
            "phases": [{"epochs": 2, "frozen": True, "lr": 0.05}],
            "batch_size": 16,
            **overrides,
        }
    )


def test_paths_follow_a_symbolic_link_where_normpath_would_not(project: Path) -> None:
    """``link/../run`` with ``link`` a symbolic link to ``deep/er``: the run writes to
    ``deep/run`` (as the OS resolves it); a lexical normpath would say ``run``."""
    (project / "deep" / "er").mkdir(parents=True)
    (project / "link").symlink_to(project / "deep" / "er", target_is_directory=True)
    lines: list[str] = []
    summary = run_finetune(
        _spec(output_dir="../link/../run"),
        digits_cnn(2),
        base_dir=str(project / "rules"),
        log=lines.append,
    )
    assert summary["output_dir"] == os.path.realpath(project / "deep" / "run")
    assert not (project / "run").exists()
    on_disk = json.loads((project / "deep" / "run" / "summary.json").read_text())
    assert on_disk["files"] == summary["files"]
    for path in summary["files"].values():
        assert_resolved(path)
        assert Path(path).is_file(), path
    assert closing_block("\n".join(lines))["best"].group(2) == summary["files"]["best"]


def test_curves_not_written_says_why(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    run = project / "rules" / "run"
    run.mkdir()
    (run / "curves.png").write_bytes(b"an earlier run's")
    lines: list[str] = []
    summary = run_finetune(
        _spec(output_dir="run"), digits_cnn(2), base_dir=str(project / "rules"), log=lines.append
    )
    assert (run / "curves.png").read_bytes() == b"an earlier run's"  # left, and said so
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["files"]["curves"] is None and summary["files"]["curves"] is None
    assert "matplotlib is not installed" in on_disk["curves_not_written"]
    assert lines[-1].startswith("  curves:  not written (matplotlib is not installed")
    assert lines[-1].endswith("; the curves.png there is an earlier run's"), lines[-1]
    assert (run / "best.safetensors").is_file()  # the rest is there as ever


def test_best_epoch_is_the_first_with_the_highest_score() -> None:
    def m(epoch: int, **values) -> dict:
        return {"epoch": epoch, "train_loss": 1.0, "val_loss": None, "val_acc": None, **values}

    accs = [m(1, val_acc=0.5), m(2, val_acc=0.7), m(3, val_acc=0.7), m(4, val_acc=0.6)]
    assert best_epoch(accs) == {"epoch": 2, "metric": "val_acc", "value": 0.7}
    losses = [m(1, val_loss=0.5), m(2, val_loss=0.3), m(3, val_loss=0.3), m(4, val_loss=0.4)]
    assert best_epoch(losses) == {"epoch": 2, "metric": "val_loss", "value": 0.3}
    assert best_epoch([m(1, train_loss=0.9), m(2, train_loss=0.2)])["epoch"] == 2
    nan = [m(1, train_loss=math.nan), m(2, train_loss=math.nan)]
    assert best_epoch(nan) is None  # the runner wrote no best.safetensors either
    summary = {
        "epochs": 2,
        "seconds": 0.5,
        "output_dir": "/nonexistent/r",
        "best": None,
        "final": nan[-1],
        "files": {"best": None, "last": "/r/last.safetensors", "summary": "/r/summary.json",
                  "curves": "/r/curves.png"},
    }  # fmt: skip
    assert closing_lines(summary)[1] == "  best:    not written (no epoch had a finite score)"


def test_output_dir_expands_home_as_every_other_path(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(project / "home"))
    phases = [{"epochs": 1, "frozen": True, "lr": 0.05}]
    summary = run_finetune(
        _spec(output_dir="~/run", phases=phases),
        digits_cnn(2),
        base_dir=str(project / "rules"),
        log=lambda _line: None,
    )
    assert summary["output_dir"] == os.path.realpath(project / "home" / "run")
    assert Path(summary["files"]["last"]).is_file()
