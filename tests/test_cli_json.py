"""``--json`` on every command: the result, or on failure ``{"error": {type, message,
exit_code}}`` on stdout besides the one line on stderr; internal errors exit 70."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import REPO
from safetensors.torch import save_file

from ckptsurgeon.cli import cli


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("json")
    save_file({"w": torch.ones(2, 2)}, root / "a.safetensors")
    (root / "bad.yaml").write_text("version: 1\nrules:\n  - op: nope\n")
    (root / "nofit.yaml").write_text(
        yaml.safe_dump(
            {
                "source": "a.safetensors",
                "target": {"manifest": "m.json"},
                "output": "o.safetensors",
                "rules": [],
            }
        )
    )
    (root / "m.json").write_text(json.dumps({"tensors": {"v": {"shape": [2], "dtype": "float32"}}}))
    return root


def error_of(proc, code: int) -> dict:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stderr.strip()
    obj = json.loads(proc.stdout)
    assert obj["error"]["exit_code"] == code and obj["error"]["message"]
    return obj


@pytest.mark.parametrize(
    ("args", "code", "kind"),
    [
        (["inspect", "missing.safetensors"], 3, "InputError"),
        (["convert", "a.safetensors", "o.pt", "--dtype", "int8"], 2, "UsageError"),
        (["convert", "missing.pt", "o.pt"], 3, "InputError"),
        (["apply", "bad.yaml"], 2, "RulesError"),
        (["apply", "nofit.yaml"], 1, "PlanFailed"),
        (["check", "missing.pt", "--target", "m.json"], 3, "InputError"),
        (["diff", "a.safetensors"], 2, "UsageError"),
        (["validate", "bad.yaml"], 2, "RulesError"),
        (["verify", "nofit.yaml"], 2, "UsageError"),
        (["finetune", "nofit.yaml"], 2, "UsageError"),
    ],
)
def test_json_errors_for_every_command(run_cli, project: Path, args, code: int, kind: str):
    obj = error_of(run_cli(*args, "--json", cwd=project), code)
    assert obj["error"]["type"] == kind
    if args[0] == "apply" and code == 1:  # the failed plan's report comes with the error
        assert obj["check"]["ok"] is False and obj["check"]["missing"] == ["v"]
    assert not (project / "o.pt").exists() and not (project / "o.safetensors").exists()


def test_json_results_for_convert_validate_and_env(run_cli, project: Path, tmp_path: Path):
    out = tmp_path / "c.safetensors"
    proc = run_cli("convert", project / "a.safetensors", out, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["output"] == str(out)
    valid = json.loads(
        run_cli("validate", REPO / "rules" / "meta_llama_to_hf.yaml", "--json").stdout
    )
    assert valid["valid"] and valid["sections"] == ["target", "verify"]
    env = json.loads(run_cli("env", "--json").stdout)
    # The installed distribution's version, as its metadata says ("2.x.y+cpu" where a local
    # tag is part of it); ``torch.__version__`` of the process running the tests agrees.
    assert env["libraries"]["torch"] == metadata.version("torch")
    assert env["libraries"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert env["torch_weights_only"]["cve"].startswith("CVE-")


def test_an_internal_error_is_exit_70_asking_for_a_report(monkeypatch, project: Path):
    import ckptsurgeon.formats

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    torch.save({"w": torch.ones(1)}, project / "t.pt")  # read through open_checkpoint
    monkeypatch.setattr(ckptsurgeon.formats, "open_checkpoint", broken)
    result = CliRunner().invoke(cli, ["inspect", str(project / "t.pt"), "--json"])
    assert result.exit_code == 70
    assert "this is a bug in ckptsurgeon" in result.stderr
    assert json.loads(result.stdout)["error"] == {
        "type": "RuntimeError",
        "message": "boom",
        "exit_code": 70,
    }
