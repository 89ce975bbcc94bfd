"""``apply --skip-up-to-date``: a pipeline step whose inputs did not change costs nothing;
any changed byte of a source or any changed rule reruns it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    """On a 256 MiB source the check reads headers, the rules and ``stat`` only: the bytes
    the process reads (``rchar`` in ``/proc/self/io``: every read(2), page cache or not) and
    the pages it maps in (peak resident set, which counts a mapped file's touched pages) stay
    far below the tensor data, and torch stays out of the process."""
    rules = project(tmp_path, size=64 * 2**20)
    assert run_cli("apply", rules, "-q").returncode == 0
    data = 2**28  # the source's tensor bytes; the output holds as many again
    assert os.path.getsize(tmp_path / "out.safetensors") > data
    code = (
        "import sys\n"
        "def rchar():\n"
        "    with open('/proc/self/io') as f:\n"
        "        return int(dict(l.split(': ') for l in f.read().splitlines())['rchar'])\n"
        "def peak():\n"
        "    with open('/proc/self/status') as f:\n"
        "        line = next(l for l in f if l.startswith('VmHWM:'))\n"
        "    return int(line.split()[1]) * 1024\n"
        "from ckptsurgeon.cli import cli\n"
        "def check():\n"
        "    try:\n"
        f"        cli(['apply', {str(rules)!r}, '--skip-up-to-date', '-q'])\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, exc.code\n"
        "before = rchar(); check(); first = rchar(); check(); second = rchar()\n"
        "print('torch' in sys.modules, first - before, second - first, peak())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded, first, second, peak = proc.stdout.split()
    assert loaded == "False"
    # The first check also imports what it needs (about 2.6 MB of bytecode when measured);
    # the second, with every module loaded, reads the rules and two headers (about 46 kB).
    # Reading or hashing the source (256 MiB) or the output (as much) breaks either bound.
    assert int(first) < data // 16, f"the first check read {first} bytes"
    assert int(second) < 2**20, f"a check with its modules loaded read {second} bytes"
    # Mapping the files and touching their pages reads no bytes with read(2) but makes them
    # resident (about 37 MB is the whole process when measured).
    assert int(peak) < data // 2, f"peak resident set {peak} bytes"
