"""The Python API returns what the CLI prints: for each command, ``ckptsurgeon.<command>(...)
.to_dict()`` equals the ``--json`` the command prints on the same inputs, and
``ckptsurgeon.apply`` takes the command's options (``skip_up_to_date``, ``report``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO
from safetensors.torch import save_file

import ckptsurgeon
from ckptsurgeon import api
from ckptsurgeon.engine.plan import PlanFailed

LINEAR = {"model": "torch.nn:Linear", "kwargs": {"in_features": 4, "out_features": 3}}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A data-parallel checkpoint of a Linear, rules that strip its prefix and verify the
    result computes what the source computed, and a rules file that cannot fit."""
    torch.manual_seed(0)
    state = torch.nn.Linear(4, 3).state_dict()
    save_file({f"module.{k}": v for k, v in state.items()}, tmp_path / "dp.safetensors")
    save_file(dict(state), tmp_path / "plain.safetensors")
    torch.save({"state_dict": dict(state)}, tmp_path / "plain.pt")
    inputs = [{"shape": [2, 4], "dtype": "float32"}]
    strip = [{"op": "strip_prefix", "prefix": "module."}]
    doc = {
        "version": 1,
        "source": "dp.safetensors",
        "target": LINEAR,
        "output": "out.safetensors",
        "rules": strip,
        "verify": {"reference": {**LINEAR, "rules": strip}, "inputs": inputs},
    }
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    nofit = {**doc, "rules": [], "output": "nofit.safetensors"}
    del nofit["verify"]
    (tmp_path / "nofit.yaml").write_text(yaml.safe_dump(nofit, sort_keys=False))
    return tmp_path


def cli_json(run_cli, *args: Any, code: int = 0, cwd: Path | None = None) -> dict[str, Any]:
    proc = run_cli(*args, "--json", cwd=cwd)
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    return json.loads(proc.stdout)


def untimed(report: dict[str, Any]) -> dict[str, Any]:
    """An apply report without ``seconds``: how long planning and writing took is the one
    field that differs from run to run (SPEC: the work time benchmarks compare)."""
    return {k: v for k, v in report.items() if k != "seconds"}


def test_inspect_from_headers_and_with_verify(run_cli, project: Path) -> None:
    path = project / "dp.safetensors"
    assert ckptsurgeon.inspect(path).to_dict() == cli_json(run_cli, "inspect", path)
    verified = ckptsurgeon.inspect(path, verify=True, pattern="weight")
    assert verified.to_dict() == cli_json(
        run_cli, "inspect", path, "--verify", "--filter", "weight"
    )
    assert "verify" in verified.to_dict() and verified.verify_lines()
    pickled = project / "plain.pt"
    result = ckptsurgeon.inspect(pickled, key="state_dict")
    assert result.to_dict() == cli_json(run_cli, "inspect", pickled, "--key", "state_dict")


def test_check_passes_and_fails_alike(run_cli, project: Path) -> None:
    kwargs = json.dumps(LINEAR["kwargs"])
    for name, code in (("plain.safetensors", 0), ("dp.safetensors", 1)):
        path = project / name
        result = ckptsurgeon.check(path, LINEAR["model"], kwargs=LINEAR["kwargs"])
        cli = cli_json(
            run_cli, "check", path, "--target", LINEAR["model"], "--kwargs", kwargs, code=code
        )
        assert result.to_dict() == cli and result.ok == (code == 0)


def test_diff_plain_against_a_target_and_with_suggest(run_cli, project: Path) -> None:
    a, b = project / "dp.safetensors", project / "plain.safetensors"
    result = ckptsurgeon.diff(a, b)
    assert result.to_dict() == cli_json(run_cli, "diff", a, b, code=1) and not result.same
    same = ckptsurgeon.diff(b, b)
    assert same.to_dict() == cli_json(run_cli, "diff", b, b) and same.ok
    target = ("--target", LINEAR["model"], "--kwargs", json.dumps(LINEAR["kwargs"]))
    suggested = ckptsurgeon.diff(a, target=LINEAR["model"], kwargs=LINEAR["kwargs"], suggest=True)
    # The rules file names A by its absolute path, so the two agree from any folder.
    assert suggested.to_dict() == cli_json(run_cli, "diff", a, *target, "--suggest")
    assert suggested.ok and "strip_prefix" in suggested.to_dict()["rules_file"]


def test_diff_suggest_with_verify(run_cli, project: Path) -> None:
    a = project / "plain.safetensors"  # loads into the reference model as it is
    ref = {"in_features": 4, "out_features": 3}
    result = ckptsurgeon.diff(
        a,
        target=LINEAR["model"],
        kwargs=LINEAR["kwargs"],
        suggest=True,
        verify=True,
        reference="torch.nn:Linear",
        reference_kwargs=ref,
    )
    cli = cli_json(
        run_cli, "diff", a, "--target", LINEAR["model"], "--kwargs", json.dumps(LINEAR["kwargs"]),
        "--suggest", "--verify", "--reference", "torch.nn:Linear",
        "--reference-kwargs", json.dumps(ref), code=0 if result.ok else 4,
    )  # fmt: skip
    assert result.to_dict() == cli and "verify" in cli


def test_convert(run_cli, project: Path) -> None:
    source, out = project / "plain.pt", project / "converted.safetensors"
    cli = cli_json(run_cli, "convert", source, out, "--key", "state_dict", "--dtype", "float16")
    os.remove(out)
    result = ckptsurgeon.convert(str(source), str(out), key="state_dict", dtype="float16")
    assert result.to_dict() == cli and result.path == str(out) and out.exists()


def test_validate_and_verify(run_cli, project: Path) -> None:
    rules = project / "rules.yaml"
    assert ckptsurgeon.validate(str(rules)).to_dict() == cli_json(run_cli, "validate", rules)
    ckptsurgeon.apply(rules)
    result = ckptsurgeon.verify(rules)
    assert result.to_dict() == cli_json(run_cli, "verify", rules) and result["ok"]


def test_finetune_dry_run(run_cli, tmp_path: Path) -> None:
    (tmp_path / "ft.yaml").write_text(
        f"version: 1\nsource: none.safetensors\n"
        f"target: {{model: {REPO / 'rules' / 'models.py'}:digits_cnn, kwargs: {{num_classes: 2}}}}\n"
        "output: init.safetensors\nrules: []\n"
        "finetune:\n"
        "  data: {train: {tensors: train.safetensors}}\n"
        "  freeze: {modules: [features], except: ['^fc\\.']}\n"
        "  phases: [{epochs: 1, frozen: true, lr: 0.05}]\n"
    )
    # ckptsurgeon.finetune is also the runner's subpackage: calling it runs the command.
    import ckptsurgeon.finetune.runner  # binds the subpackage here, as any such import does

    result = ckptsurgeon.finetune(tmp_path / "ft.yaml", dry_run=True)
    assert result.to_dict() == cli_json(run_cli, "finetune", tmp_path / "ft.yaml", "--dry-run")
    assert api.finetune(tmp_path / "ft.yaml", dry_run=True).to_dict() == result.to_dict()


def test_apply_dry_run_and_write(run_cli, project: Path) -> None:
    rules = project / "rules.yaml"
    dry = ckptsurgeon.apply(rules, dry_run=True)
    assert dry.to_dict() == cli_json(run_cli, "apply", rules, "--dry-run")
    cli = cli_json(run_cli, "apply", rules)
    os.remove(project / "out.safetensors")
    result = ckptsurgeon.apply(rules, durable=False, progress=False)
    assert untimed(result.to_dict()) == {
        **untimed(cli),
        "written": {**cli["written"], "durable": False},
    }
    # Read as a dict, as callers of the dict the API used to return do.
    assert result["written"]["path"] == str(project / "out.safetensors") and result["verify"]["ok"]
    assert result.report is not None and result.report.written is not None


def test_apply_skip_up_to_date_writes_nothing(run_cli, project: Path) -> None:
    rules, out = project / "rules.yaml", project / "out.safetensors"
    first = ckptsurgeon.apply(rules, skip_up_to_date=True)
    assert first["up_to_date"] is False and out.exists()
    before = os.stat(out)
    result = ckptsurgeon.apply(rules, skip_up_to_date=True)
    assert result.up_to_date and result.to_dict() == {"output": str(out), "up_to_date": True}
    assert result.to_dict() == cli_json(run_cli, "apply", rules, "--skip-up-to-date")
    after = os.stat(out)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_apply_writes_its_report_also_when_the_plan_fails(run_cli, project: Path) -> None:
    rules = project / "rules.yaml"
    report = project / "report.json"
    result = ckptsurgeon.apply(rules, report=report)
    assert json.loads(report.read_text()) == result.to_dict()
    up_to_date = ckptsurgeon.apply(rules, report=report, skip_up_to_date=True)
    assert (
        json.loads(report.read_text())
        == up_to_date.to_dict()
        == {
            "output": str(project / "out.safetensors"),
            "up_to_date": True,
        }
    )

    nofit = project / "nofit.yaml"
    with pytest.raises(PlanFailed) as caught:
        ckptsurgeon.apply(nofit, report=report)
    written = json.loads(report.read_text())
    assert written == caught.value.report.to_dict() and written["check"]["ok"] is False
    cli = cli_json(run_cli, "apply", nofit, "--report", project / "cli.json", code=1)
    assert {k: v for k, v in cli.items() if k != "error"} == written
    assert json.loads((project / "cli.json").read_text()) == written
    assert not (project / "nofit.safetensors").exists()


def test_the_api_names_no_flags(project: Path) -> None:
    """Library errors name the arguments: a caller of the API has no flags to give."""
    with pytest.raises(ckptsurgeon.UsageError) as caught:
        ckptsurgeon.convert(str(project / "plain.pt"), str(project / "o.pt"), dtype="int8")
    assert "floating-point dtype" in str(caught.value) and "--" not in str(caught.value)
    with pytest.raises(ckptsurgeon.UsageError) as caught:
        ckptsurgeon.diff(project / "dp.safetensors")
    assert "--" not in str(caught.value)
    shutil.rmtree(project / "nowhere", ignore_errors=True)
    with pytest.raises(ckptsurgeon.UsageError) as caught:
        ckptsurgeon.apply(project / "rules.yaml", report=project / "nowhere" / "r.json")
    assert "--" not in str(caught.value)


def test_the_cli_prints_a_plugin_warning_as_one_line() -> None:
    """A skipped plug-in is one ``ckptsurgeon: warning:`` line, not Python's two-line
    warning with a file and source line; other warnings keep Python's form."""
    import subprocess
    import sys

    code = (
        "import warnings\n"
        "from ckptsurgeon.cli import _plugin_warnings_on_one_line\n"
        "from ckptsurgeon.plugins import PluginWarning\n"
        "_plugin_warnings_on_one_line()\n"
        "warnings.warn('plug-in x (x-dist 1.0): failed to load', PluginWarning)\n"
        "warnings.warn('something else', UserWarning)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == "ckptsurgeon: warning: plug-in x (x-dist 1.0): failed to load"
    assert "UserWarning: something else" in lines[1]  # Python's form, untouched
