"""``apply --skip-up-to-date``: a pipeline step whose inputs did not change costs nothing;
any changed byte of a source or any changed rule reruns it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

RULES = {
    "source": "src.safetensors",
    "output": "out.safetensors",
    "rules": [{"op": "strip_prefix", "prefix": "module."}],
}


def project(tmp_path: Path, size: int = 1000) -> Path:
    save_file(
        {"module.w": torch.randn(size), "module.b": torch.zeros(3)}, tmp_path / "src.safetensors"
    )
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(RULES))
    return rules


def skip(run_cli, rules: Path) -> dict:
    proc = run_cli("apply", rules, "--skip-up-to-date", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_an_unchanged_step_does_nothing_and_a_changed_one_reruns(run_cli, tmp_path: Path):
    rules = project(tmp_path)
    out = tmp_path / "out.safetensors"
    assert skip(run_cli, rules)["up_to_date"] is False  # no output yet: it runs
    stamp = out.stat().st_mtime_ns
    assert skip(run_cli, rules) == {"output": str(out), "up_to_date": True}
    assert out.stat().st_mtime_ns == stamp  # not rewritten

    # One byte of the source changes: it reruns.
    src = tmp_path / "src.safetensors"
    data = bytearray(src.read_bytes())
    data[-1] ^= 1
    src.write_bytes(bytes(data))
    assert skip(run_cli, rules)["up_to_date"] is False
    assert skip(run_cli, rules)["up_to_date"] is True

    # A rule changes: it reruns.
    changed = {**RULES, "rules": [*RULES["rules"], {"op": "cast", "dtype": "float16"}]}
    rules.write_text(yaml.safe_dump(changed))
    assert skip(run_cli, rules)["up_to_date"] is False
    assert skip(run_cli, rules)["up_to_date"] is True
    # So does an option on the command line that changes how the source is read.
    proc = run_cli(
        "apply", rules, "--skip-up-to-date", "--json", "--allow-global", "argparse.Namespace"
    )
    assert proc.returncode == 0 and json.loads(proc.stdout)["up_to_date"] is False


def test_an_output_another_tool_wrote_is_not_up_to_date(run_cli, tmp_path: Path):
    rules = project(tmp_path)
    save_file({"w": torch.ones(1)}, tmp_path / "out.safetensors")
    assert skip(run_cli, rules)["up_to_date"] is False
    assert skip(run_cli, rules)["up_to_date"] is True


def test_the_check_reads_no_tensor_data_and_imports_no_torch(run_cli, tmp_path: Path):
    """On a 256 MiB source the check costs what starting the CLI costs, and torch stays
    out of the process."""
    rules = project(tmp_path, size=64 * 2**20)
    assert run_cli("apply", rules, "-q").returncode == 0
    code = (
        "import sys, time; t = time.perf_counter()\n"
        "from ckptsurgeon.cli import cli\n"
        "try:\n"
        f"    cli(['apply', {str(rules)!r}, '--skip-up-to-date', '-q'])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print('torch' in sys.modules, time.perf_counter() - t)\n"
    )
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    loaded, seconds = proc.stdout.split()
    assert loaded == "False"
    assert float(seconds) < 1.0, seconds  # the source's 256 MiB are never read
    assert wall < 10, wall
    assert os.path.getsize(tmp_path / "out.safetensors") > 2**28
