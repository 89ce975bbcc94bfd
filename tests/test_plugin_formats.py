"""Format plug-ins: the README's example (NumPy .npz, examples/plugin) installed for real and
driven through the CLI like a built-in; broken plug-ins warned about, never fatal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_failure
from safetensors.torch import load_file, save_file


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )


@pytest.fixture
def npz(tmp_path: Path) -> Path:
    """A state dict saved by NumPy itself, in a folder of its own."""
    state = {k: v.numpy() for k, v in _model().state_dict().items()}
    path = tmp_path / "in" / "weights.npz"
    path.parent.mkdir()
    np.savez(path, **state)
    return path


def test_inspect_reads_npz_through_the_plugin_only(run_with_plugin, run_cli, npz: Path) -> None:
    proc = run_with_plugin("inspect", npz, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    expected = _model().state_dict()
    assert summary["format"] == "npz"
    assert list(summary["tensors"]) == list(expected)
    for name, tensor in expected.items():
        info = summary["tensors"][name]
        assert info["shape"] == list(tensor.shape), name
        assert info["bytes"] == tensor.nbytes, name
    assert summary["tensors"]["1.num_batches_tracked"]["dtype"] == "int64"
    # Without the plug-in the zip is taken for a torch file, which it is not.
    assert_clean_failure(run_cli("inspect", npz), 3)


def test_convert_both_ways(run_with_plugin, npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    proc = run_with_plugin("convert", npz, out, "-q", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kind"] == "safetensors"
    expected = _model().state_dict()
    written = load_file(out)
    assert list(written) == sorted(expected) or set(written) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name

    back = tmp_path / "back"
    back.mkdir()
    for path, extra in ((back / "a.npz", ()), (back / "b.npz", ("--format", "npz"))):
        proc = run_with_plugin("convert", out, path, "-q", *extra)
        assert proc.returncode == 0, proc.stderr
        with np.load(path, allow_pickle=False) as archive:
            assert sorted(archive.files) == sorted(expected)
            for name, tensor in expected.items():
                assert np.array_equal(archive[name], tensor.numpy()), name


def test_npz_output_format_is_checked_against_the_path(run_with_plugin, tmp_path: Path) -> None:
    src = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(2)}, src)
    assert_clean_failure(
        run_with_plugin("convert", src, tmp_path / "o.pt", "--format", "npz"), 2, "format npz"
    )
    assert not (tmp_path / "o.pt").exists()


def test_apply_takes_an_npz_source_and_writes_npz(run_with_plugin, npz: Path, tmp_path: Path):
    """``source:`` an .npz, rules, a strict check against the model, ``output.format: npz``."""
    models = tmp_path / "models.py"
    models.write_text(
        textwrap.dedent(
            """
            import torch

            def net():
                return torch.nn.Sequential(
                    torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                    torch.nn.Linear(8, 3),
                )

            def wrapped():
                return torch.nn.ModuleDict({"body": net()})
            """
        )
    )
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"version: 1\nsource: {npz}\n"
        "target: {model: models.py:wrapped}\n"
        "output: {path: out/wrapped.npz, format: npz}\n"
        "rules:\n  - {op: add_prefix, prefix: body.}\n"
    )
    (tmp_path / "out").mkdir()
    assert run_with_plugin("validate", rules).returncode == 0
    proc = run_with_plugin("apply", rules, "-q", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["check"]["ok"] is True
    expected = _model().state_dict()
    with np.load(tmp_path / "out" / "wrapped.npz", allow_pickle=False) as archive:
        assert sorted(archive.files) == sorted(f"body.{k}" for k in expected)
        for name, tensor in expected.items():
            assert np.array_equal(archive[f"body.{name}"], tensor.numpy()), name


def test_env_lists_the_plugin(run_with_plugin) -> None:
    proc = run_with_plugin("env", "--json")
    assert proc.returncode == 0, proc.stderr
    env = json.loads(proc.stdout)
    npz = next(f for f in env["formats"] if f["name"] == "npz")
    assert npz["plugin"] == "ckptsurgeon-npz 0.1.0" and npz["writes"] == ["npz"]
    loaded = {(p["group"], p["name"]) for p in env["plugins"] if p["loaded"]}
    assert ("ckptsurgeon.formats", "npz") in loaded
    assert "format npz (plug-in ckptsurgeon-npz 0.1.0)" in run_with_plugin("env").stdout


# -- broken plug-ins -----------------------------------------------------------------------

BROKEN = {
    "crash.py": "raise RuntimeError('this plug-in cannot even import')\n",
    "notformat.py": "class Thing:\n    name = 'thing'\n",
    "dup.py": """
        from ckptsurgeon.formats.family import Format, Sniff

        class Dup(Format):
            name = "safetensors"  # taken by the built-in
            formats = ("dup",)

            def sniff(self, probe):
                return Sniff("dup", 1.0)  # would claim everything if it were let in

            def open(self, request):
                raise AssertionError("never asked")
        """,
    "sniffy.py": """
        from ckptsurgeon.formats.family import Format

        class Sniffy(Format):
            name = "sniffy"
            formats = ("sniffy",)

            def sniff(self, probe):
                raise RuntimeError("sniff blew up")

            def open(self, request):
                raise AssertionError("never asked")
        """,
    "liar.py": """
        from ckptsurgeon.formats.checkpoint import Checkpoint
        from ckptsurgeon.formats.family import Format, Sniff

        class Liar(Format):
            name = "liar"
            formats = ("liar",)

            def sniff(self, probe):
                return Sniff("liar", 1.0) if probe.path.endswith(".liar") else None

            def open(self, request):
                return Checkpoint(request.path, "liar", {"w": [1.0, 2.0]})
        """,
}
ENTRY_POINTS = """\
[ckptsurgeon.formats]
crash = broken_plugins.crash:Crash
notformat = broken_plugins.notformat:Thing
dup = broken_plugins.dup:Dup
sniffy = broken_plugins.sniffy:Sniffy
liar = broken_plugins.liar:Liar
"""


@pytest.fixture
def broken_site(tmp_path: Path) -> Path:
    """A distribution ``broken-plugins`` as pip lays one out: the package and its
    dist-info (METADATA, entry_points.txt)."""
    site = tmp_path / "site"
    package = site / "broken_plugins"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, code in BROKEN.items():
        (package / name).write_text(textwrap.dedent(code))
    info = site / "broken_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return site


def _run(site: Path, *args: object) -> subprocess.CompletedProcess[str]:
    path = [str(site), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    return subprocess.run(
        [sys.executable, "-m", "ckptsurgeon", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def test_broken_plugins_are_warnings_and_builtins_still_work(broken_site: Path, tmp_path: Path):
    src = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(4.0)}, src)
    proc = _run(broken_site, "inspect", src, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "safetensors"  # not taken over by "dup"
    assert "Traceback" not in proc.stderr
    for name, why in (
        ("crash", "cannot even import"),
        ("notformat", "not a ckptsurgeon.formats.family.Format"),
        ("dup", "already taken"),
        ("sniffy", "sniff blew up"),
    ):
        lines = [line for line in proc.stderr.splitlines() if f"'{name}'" in line]
        assert lines, (name, proc.stderr)
        assert any("broken-plugins 0.1" in line and why in line for line in lines), lines

    out = tmp_path / "out.safetensors"
    proc = _run(broken_site, "convert", src, out, "-q")
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(load_file(out)["w"], torch.arange(4.0))


def test_a_plugin_reader_returning_non_tensors_is_exit_70(broken_site: Path, tmp_path: Path):
    liar = tmp_path / "w.liar"
    liar.write_bytes(b"anything")
    proc = _run(broken_site, "inspect", liar)
    assert_clean_failure(proc, 70, "'liar'", "broken-plugins 0.1", "not a TensorRef")
    out = tmp_path / "out.safetensors"
    proc = _run(broken_site, "convert", liar, out)
    assert_clean_failure(proc, 70, "'liar'")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["site", "w.liar"]
    assert liar.read_bytes() == b"anything"


def test_an_installed_plugin_keeps_validate_torch_free(plugin_site: Path) -> None:
    """Every command builds the registries, plug-ins included; the example imports torch
    only when it opens or writes, so ``validate`` and ``schema`` stay fast."""
    code = (
        "import sys, ckptsurgeon.rules.document\n"
        "from ckptsurgeon.formats import registry\n"
        "assert 'npz' in registry.output_format_names()\n"
        "print('torch' in sys.modules)"
    )
    path = [str(plugin_site), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "False", out.stderr
