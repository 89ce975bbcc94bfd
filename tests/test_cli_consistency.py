"""The CLI behaves alike across commands (issue 31, "the first hour as a new user"):

- long lists of names are folded (``optimizer/state/{0..61}``) and typos get "did you
  mean" (``--key``, ops, rules-file fields, sources);
- arguments that can be judged alone (JSON options, a ``--target`` naming nothing, a dtype)
  fail before torch is imported, with one line and exit 2;
- ``-q`` prints nothing on success, errors still print; Ctrl-C is exit 130 with one line
  saying what was written;
- patterns are shown as written in the YAML, not with repr's doubled backslashes;
- a sharded safetensors folder is listed shard by shard in the shards' order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_clean_failure
from safetensors.torch import save_file

# -- fixtures ------------------------------------------------------------------------------


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(6)])


@pytest.fixture(scope="module")
def training_container(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a training loop saves: model, optimizer (with per-parameter state), epoch."""
    torch.manual_seed(0)
    model = _Tiny()
    opt = torch.optim.Adam(model.parameters())
    model.blocks(torch.randn(2, 3)).sum().backward()
    opt.step()
    path = tmp_path_factory.mktemp("container") / "train.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, path)
    return path


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plain")
    save_file({"fc.weight": torch.ones(2, 2), "fc.bias": torch.zeros(2)}, folder / "w.safetensors")
    return folder


def _stderr_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]


# -- 1. folded lists and "did you mean" ----------------------------------------------------


def test_key_typo_suggests_the_container_and_folds_the_indexed_ones(
    run_cli, training_container: Path, tmp_path: Path
) -> None:
    proc = run_cli("convert", training_container, tmp_path / "o.safetensors", "--key", "modle")
    assert_clean_failure(
        proc,
        2,
        "--key 'modle': no tensor container there; did you mean 'model'?",
        "(found: 'model', 'optimizer/state/{0..11}')",
    )
    assert "optimizer/state/1'" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "o.safetensors").exists()

    shown = run_cli("inspect", training_container)
    assert shown.returncode == 0, shown.stderr
    assert "containers: 'model', 'optimizer/state/{0..11}'\n" in shown.stdout, shown.stdout
    listed = json.loads(run_cli("inspect", training_container, "--json").stdout)["containers"]
    assert listed == ["model", *(f"optimizer/state/{i}" for i in range(12))]  # JSON: every one


def test_rules_typos_get_did_you_mean_at_their_line(run_cli, plain: Path) -> None:
    rules = plain / "typos.yaml"
    rules.write_text(
        "version: 1\n"
        "source: w.safetensors\n"
        "sources: {ema: w.safetensors}\n"
        "sed: 1\n"
        "rules:\n"
        "  - op: renam\n"
        "    pattern: x\n"
        "    replace: y\n"
        "  - op: drop\n"
        "    pattern: x\n"
        "    optinal: true\n"
        "  - op: keep\n"
        "    pattern: x\n"
        "    zzzzzz: 1\n"
    )
    proc = run_cli("validate", rules)
    assert_clean_failure(
        proc,
        2,
        f"{rules}:4:1: sed: unknown field; did you mean 'seed'?",
        f"{rules}:6:5: rules[0] (renam): unknown op 'renam'; did you mean 'rename'? known ops: ",
        f"{rules}:11:5: rules[1] (drop).optinal: unknown field; did you mean 'optional'?",
        f"{rules}:14:5: rules[2] (keep).zzzzzz: unknown field; expected one of: op, optional, "
        "pattern",
    )
    rules.write_text(
        "version: 1\nsource: w.safetensors\nsources: {ema: w.safetensors}\n"
        "rules:\n  - op: take\n    from: emma\n    pattern: x\n"
    )
    assert_clean_failure(
        run_cli("validate", rules),
        2,
        f"{rules}:6:5: rules[0] (take).from: no source named 'emma' under sources: "
        "(declared: 'ema'); did you mean 'ema'?",
    )


# -- 2. arguments judged before torch is imported ------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["check", "{ckpt}", "--target", "torchvision.models:resnet18", "--kwargs",
             "{num_classes: 10}"],
            "ckptsurgeon: error: --kwargs: not valid JSON (Expecting property name enclosed in "
            "double quotes at character 2); JSON quotes its keys and strings: "
            """--kwargs '{"num_classes": 10}'""",
        ),
        (
            ["check", "{ckpt}", "--target", "torchvision.models:resnet18", "--kwargs", "[10]"],
            """ckptsurgeon: error: --kwargs: expected a JSON object such as '{"num_classes": 10}'"""
            ", not an array",
        ),
        (
            ["check", "{ckpt}", "--target", "resnet18"],
            "ckptsurgeon: error: --target 'resnet18': not a file, and not 'pkg.module:callable'",
        ),
        (
            ["diff", "{ckpt}", "--target", "torchvision.models:resnet18", "--suggest",
             "--verify", "--reference", "torchvision.models:resnet18", "--reference-kwargs",
             "{'num_classes': 10}"],
            "ckptsurgeon: error: --reference-kwargs: not valid JSON",
        ),
        (
            ["diff", "{ckpt}", "--kwargs", '{"num_classes": 10}'],
            "ckptsurgeon: error: diff: give B or a target (exactly one)",
        ),
        (
            ["convert", "{ckpt}", "{out}", "--dtype", "int8"],
            "ckptsurgeon: error: dtype int8: converting casts every floating tensor",
        ),
        (
            ["convert", "{ckpt}", "{out}", "--dtype", "bfloat"],
            "ckptsurgeon: error: dtype: unknown dtype 'bfloat'; did you mean",
        ),
    ],
)  # fmt: skip
def test_bad_arguments_fail_in_one_line_before_torch_is_imported(
    plain: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    """Timed by what was imported, not by the clock: ``-X importtime`` lists every module
    the process loaded, and torch must not be among them."""
    ckpt, out = plain / "w.safetensors", tmp_path / "o.safetensors"
    argv = [{"{ckpt}": str(ckpt), "{out}": str(out)}.get(a, a) for a in args]
    for extra in ([], ["--json"]):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "ckptsurgeon", *argv, *extra],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
        imported = [
            line.rsplit("|", 1)[-1].strip()
            for line in proc.stderr.splitlines()
            if line.startswith("import time:")
        ]
        assert "ckptsurgeon.cli" in imported  # the listing is there to judge
        assert not [m for m in imported if m == "torch" or m.startswith("torch.")]
        lines = _stderr_lines(proc)
        assert len(lines) == 1 and lines[0].startswith(message), lines
        assert "Traceback" not in proc.stderr and not out.exists()
        if extra:
            error = json.loads(proc.stdout)["error"]
            assert error["type"] == "UsageError" and error["exit_code"] == 2
            assert lines[0] == f"ckptsurgeon: error: {error['message']}"


def test_the_api_judges_kwargs_json_by_the_argument_name(plain: Path) -> None:
    import ckptsurgeon

    with pytest.raises(ckptsurgeon.UsageError, match=r"^kwargs: not valid JSON"):
        ckptsurgeon.check(plain / "w.safetensors", "torchvision.models:resnet18", kwargs="{a: 1}")


# -- 3. -q, Ctrl-C, patterns, order --------------------------------------------------------


def test_quiet_prints_nothing_on_success_and_errors_still(run_cli, plain: Path) -> None:
    src = plain / "w.safetensors"
    out = plain / "q" / "o.safetensors"
    loud = run_cli("convert", src, out)
    assert loud.returncode == 0 and f"wrote {out}" in loud.stderr, loud.stderr
    out.unlink()
    quiet = run_cli("convert", src, out, "-q")
    assert quiet.returncode == 0 and out.exists(), quiet.stderr
    assert (quiet.stdout, quiet.stderr) == ("", "")
    as_json = run_cli("convert", src, plain / "q" / "j.safetensors", "-q", "--json")
    assert as_json.stderr == "" and json.loads(as_json.stdout)["kind"] == "safetensors"

    rules = plain / "quiet.yaml"
    rules.write_text(
        "version: 1\nsource: w.safetensors\noutput: q/applied.safetensors\n"
        "rules:\n  - op: rename\n    pattern: '^fc\\.'\n    replace: head.\n"
    )
    loud = run_cli("apply", rules)
    assert loud.returncode == 0 and "wrote" in loud.stdout + loud.stderr
    quiet = run_cli("apply", rules, "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert (quiet.stdout, quiet.stderr) == ("", "")

    assert_clean_failure(run_cli("convert", plain / "nope.pt", out, "-q"), 3, "nope.pt")
    assert_clean_failure(run_cli("apply", plain / "nope.yaml", "-q"), 2, "nope.yaml")


_SLOW_TARGET = """
import os, time
import torch

def make():
    open(os.environ["CKPTSURGEON_TEST_MARK"], "w").close()
    time.sleep(120)
    return torch.nn.Linear(2, 2)
"""


def _interrupt_when_marked(args: list[str], mark: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI, and press Ctrl-C (SIGINT) once ``mark`` appears."""
    env = {**os.environ, "CKPTSURGEON_TEST_MARK": str(mark)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptsurgeon", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mark.exists(), proc.communicate(timeout=30)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_ctrl_c_is_exit_130_with_one_line(tmp_path: Path, plain: Path) -> None:
    (tmp_path / "slow.py").write_text(_SLOW_TARGET)
    args = ["check", str(plain / "w.safetensors"), "--target", f"{tmp_path / 'slow.py'}:make"]
    proc = _interrupt_when_marked([*args, "--json"], tmp_path / "mark")
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr == "ckptsurgeon: interrupted; nothing was written\n", proc.stderr
    assert json.loads(proc.stdout)["error"] == {
        "type": "KeyboardInterrupt",
        "message": "interrupted; nothing was written",
        "exit_code": 130,
    }


def test_ctrl_c_in_the_fine_tune_says_the_output_is_written(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(
        _SLOW_TARGET + "\ndef linear():\n    return torch.nn.Linear(2, 2)\n"
    )
    save_file({"weight": torch.ones(2, 2), "bias": torch.zeros(2)}, tmp_path / "w.safetensors")
    rules = tmp_path / "tune.yaml"
    rules.write_text(
        "version: 1\nsource: w.safetensors\noutput: out.safetensors\n"
        "target: {model: 'slow.py:linear'}\nrules: []\n"
        "finetune:\n  data:\n    train: {factory: 'slow.py:make'}\n"
        "  phases: [{epochs: 1, frozen: false, lr: 0.1}]\n  output_dir: run\n"
    )
    proc = _interrupt_when_marked(["apply", str(rules), "-q"], tmp_path / "mark")
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    out = tmp_path / "out.safetensors"
    assert out.exists()
    assert proc.stderr == (
        f"ckptsurgeon: interrupted during the fine-tune; {out} had been written in full "
        f"before it; `ckptsurgeon finetune {rules} --resume` continues from the last "
        "completed epoch, if any\n"
    ), proc.stderr
    assert proc.stdout == ""


_SWALLOWING_TARGET = """
import os, signal, sys
import torch

def make():
    try:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10**6):
            pass
    except KeyboardInterrupt:
        pass  # as torch does when Ctrl-C lands in its (C-level) import of numpy
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fresh_module_for_the_test  # the next import after the lost interrupt
    return torch.nn.Linear(2, 2)
"""


def test_ctrl_c_that_a_library_swallows_is_not_lost(run_cli, tmp_path: Path, plain: Path) -> None:
    """Without the re-raise the command would go on and fail the check (exit 1)."""
    (tmp_path / "swallow.py").write_text(_SWALLOWING_TARGET)
    (tmp_path / "fresh_module_for_the_test.py").write_text("")
    proc = run_cli("check", plain / "w.safetensors", "--target", f"{tmp_path / 'swallow.py'}:make")
    assert proc.returncode == 130, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr == "ckptsurgeon: interrupted; nothing was written\n", proc.stderr


def test_ctrl_c_before_a_command_runs_is_130_too(monkeypatch) -> None:
    """While the command line is read (plug-ins found, torch's version checked), click
    would say "Aborted!" and exit 1."""
    from ckptsurgeon import _torchcheck
    from ckptsurgeon.cli import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(_torchcheck, "installed_torch", interrupted)
    result = CliRunner().invoke(cli, ["env"])
    assert result.exit_code == 130, result.output
    assert result.stderr == "ckptsurgeon: interrupted; nothing was written\n"


def test_patterns_are_shown_as_written_in_the_yaml(run_cli, plain: Path) -> None:
    rules = plain / "nomatch.yaml"
    rules.write_text(
        "version: 1\nsource: w.safetensors\noutput: q/none.safetensors\n"
        "rules:\n  - op: drop\n    pattern: '^head\\.'\n"
    )
    assert_clean_failure(
        run_cli("apply", rules), 1, r"rules[0] (drop): pattern '^head\.' matched no key"
    )
    proc = run_cli("inspect", plain / "w.safetensors", "--filter", r"(\.")
    assert_clean_failure(proc, 2, r"invalid regular expression '(\.':")
    assert "\\\\" not in proc.stderr


def test_show_pattern_quotes_as_yaml_does() -> None:
    from ckptsurgeon.rules.patterns import show_pattern

    assert show_pattern(r"^fc\.") == r"'^fc\.'"
    assert show_pattern("it's") == '"it\'s"'
    assert show_pattern(r"it's\.") == r"'it''s\.'"
    assert show_pattern("a\nb") == repr("a\nb")


def test_a_sharded_folder_is_listed_in_shard_order(run_cli, tmp_path: Path) -> None:
    """The index's weight_map is sorted by name, so the shard holding ``a`` would come
    first by the index; the folder is listed as it was written, shard 1 first."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({"z.weight": torch.ones(2)}, folder / first)
    save_file({"a.weight": torch.ones(3)}, folder / second)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"a.weight": second, "z.weight": first}})
    )
    proc = run_cli("inspect", folder, "--json")
    assert proc.returncode == 0, proc.stderr
    assert list(json.loads(proc.stdout)["tensors"]) == ["z.weight", "a.weight"]
