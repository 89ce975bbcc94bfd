"""Plug-in ops (entry-point group ``ckptsurgeon.ops``): the example distribution's ``scale``
op, installed for real, joins ``validate``, ``schema``, file:line errors and ``apply`` like a
built-in; broken plug-ins are skipped with one warning each and leave the built-ins alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_failure
from safetensors.torch import load_file, save_file

SCALE_RULES = """\
version: 1
source: src.safetensors
output: out.safetensors
rules:
  - op: scale
    pattern: '\\.weight$|^count$'
    factor: 2.5
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    save_file(
        {
            "fc.weight": torch.randn(3, 4, generator=gen),
            "fc.bias": torch.randn(3, generator=gen),
            "emb.weight": torch.randn(5, 2, generator=gen).to(torch.bfloat16),
            "count": torch.tensor([3, 7], dtype=torch.int64),  # matches, but is not a float
        },
        tmp_path / "src.safetensors",
    )
    (tmp_path / "rules.yaml").write_text(SCALE_RULES)
    return tmp_path


def test_validate_knows_the_plugin_op_only_when_installed(
    project: Path, run_cli, run_with_plugin
) -> None:
    rules = project / "rules.yaml"
    proc = run_with_plugin("validate", rules)
    assert proc.returncode == 0, proc.stderr
    assert "valid (1 rules)" in proc.stdout
    assert "Traceback" not in proc.stderr

    assert_clean_failure(
        run_cli("validate", rules), 2, f"{rules}:5:5: rules[0] (scale): unknown op 'scale'"
    )


def test_unknown_op_lists_plugin_ops_among_the_known(project: Path, run_with_plugin) -> None:
    rules = project / "rules.yaml"
    rules.write_text(SCALE_RULES.replace("op: scale", "op: scael"))
    proc = run_with_plugin("validate", rules)
    assert_clean_failure(proc, 2, f"{rules}:5:5: rules[0] (scael): unknown op 'scael'")
    known = proc.stderr.split("known ops: ", 1)[1].splitlines()[0].split(", ")
    assert "scale" in known and "rename" in known


def _op_names(schema: dict) -> set[str]:
    consts = {
        v["properties"]["op"]["const"]
        for v in schema["$defs"].values()
        if "const" in v.get("properties", {}).get("op", {})
    }
    mapping = set(schema["properties"]["rules"]["items"]["discriminator"]["mapping"])
    assert consts == mapping
    return mapping


def test_schema_has_the_plugin_op_only_when_installed(run_cli, run_with_plugin) -> None:
    with_plugin = json.loads(run_with_plugin("schema").stdout)
    without = json.loads(run_cli("schema").stdout)
    assert _op_names(with_plugin) == _op_names(without) | {"scale"}
    assert "scale" not in _op_names(without)
    scale = with_plugin["$defs"]["Scale"]
    assert scale["properties"]["op"]["const"] == "scale"
    assert {"pattern", "factor"} <= set(scale["required"])
    assert scale["properties"]["factor"]["type"] == "number"
    assert scale["additionalProperties"] is False


def test_apply_scales_matching_floats_and_leaves_the_rest(project: Path, run_with_plugin) -> None:
    proc = run_with_plugin("apply", project / "rules.yaml", cwd="/")
    assert proc.returncode == 0, proc.stderr
    src = load_file(project / "src.safetensors")
    out = load_file(project / "out.safetensors")
    assert list(out) == list(src)
    for name in ("fc.weight", "emb.weight"):
        assert out[name].dtype == src[name].dtype
        assert torch.equal(out[name], src[name] * 2.5), name
        assert not torch.equal(out[name], src[name])
    for name in ("fc.bias", "count"):  # not matched; matched but integer
        assert out[name].dtype == src[name].dtype and torch.equal(out[name], src[name]), name
    assert "scaled" in proc.stdout  # the plan names the op's action


def test_a_bad_field_is_a_file_line_error(project: Path, run_with_plugin) -> None:
    rules = project / "rules.yaml"
    rules.write_text(SCALE_RULES.replace("factor: 2.5", "factor: x"))
    assert_clean_failure(
        run_with_plugin("validate", rules), 2, f"{rules}:7:5: rules[0] (scale).factor:"
    )
    rules.write_text(SCALE_RULES.replace("factor: 2.5", "factor: 2.5\n    scope: all"))
    assert_clean_failure(
        run_with_plugin("apply", rules), 2, f"{rules}:8:5: rules[0] (scale).scope: unknown field"
    )
    assert not (project / "out.safetensors").exists()


# -- broken plug-ins ----------------------------------------------------------------------

BROKEN_DIST = "broken-ops-plugin"
BROKEN_ENTRY_POINTS = """\
[ckptsurgeon.ops]
boom = broken_ops_boom:Boom
notanop = broken_ops:not_an_op
myrename = broken_ops:Rename
"""
BROKEN_MODULE = '''\
from typing import Literal

from ckptsurgeon.rules.ops import Op


def not_an_op():
    return None


class Rename(Op):
    """Would take the built-in's name and drop every key instead."""

    op: Literal["rename"] = "rename"
    to: str

    def rewrite(self, table, ctx):
        return {}, len(table)
'''


@pytest.fixture
def broken_site(tmp_path: Path) -> Path:
    """A distribution written by hand: its metadata, entry points and two modules."""
    site = tmp_path / "site"
    info = site / "broken_ops_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {BROKEN_DIST}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(BROKEN_ENTRY_POINTS)
    (site / "broken_ops_boom.py").write_text("raise RuntimeError('broken on purpose')\n")
    (site / "broken_ops.py").write_text(BROKEN_MODULE)
    return site


def _run_broken(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, "-m", "ckptsurgeon", *map(str, args)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def test_broken_plugins_warn_once_each_and_leave_the_builtins(
    tmp_path: Path, broken_site: Path
) -> None:
    save_file({"a.weight": torch.ones(2), "a.bias": torch.zeros(2)}, tmp_path / "src.safetensors")
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        textwrap.dedent("""\
            version: 1
            source: src.safetensors
            output: out.safetensors
            rules:
              - op: rename
                pattern: '^a\\.'
                replace: 'b.'
            """)
    )
    proc = _run_broken(broken_site, "validate", rules)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if BROKEN_DIST in line]
    assert len(lines) == 3, proc.stderr
    for name, why in (
        ("boom", "RuntimeError: broken on purpose"),
        ("notanop", "not a subclass of ckptsurgeon.rules.ops.Op"),
        ("myrename", "'rename' is already taken"),
    ):
        (line,) = (line for line in lines if f"'{name}'" in line)
        assert why in line, (name, line)

    proc = _run_broken(broken_site, "apply", rules)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = load_file(tmp_path / "out.safetensors")
    assert sorted(out) == ["b.bias", "b.weight"]  # the built-in rename ran
