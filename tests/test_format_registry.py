"""The format registry is the one place formats are told apart: no module outside a
family's own compares a checkpoint's format with a name, and every question about formats
(detection, output kinds, output.format choices, inspect's extra fields) goes through it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ckptsurgeon.errors import UsageError
from ckptsurgeon.formats import registry

PACKAGE = Path(__file__).resolve().parent.parent / "ckptsurgeon"
FAMILIES = PACKAGE / "formats" / "families"


def _format_comparisons(path: Path) -> list[str]:
    """``x.format == "gguf"``, ``fmt in ("dcp", ...)``: dispatch on a format's name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        names = [s for s in sides if isinstance(s, ast.Attribute) and s.attr == "format"]
        names += [s for s in sides if isinstance(s, ast.Name) and s.id == "fmt"]
        literals = [
            s
            for s in sides
            if isinstance(s, ast.Tuple) or (isinstance(s, ast.Constant) and s.value is not None)
        ]
        if names and literals:
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_only_a_family_dispatches_on_its_format_name() -> None:
    offenders = [
        hit
        for path in PACKAGE.rglob("*.py")
        if FAMILIES not in path.parents
        for hit in _format_comparisons(path)
    ]
    assert not offenders, offenders


def test_the_comparison_finder_finds_comparisons(tmp_path: Path) -> None:
    probe = tmp_path / "x.py"
    probe.write_text('if ckpt.format == "gguf":\n    pass\nif fmt in ("a", "b"):\n    pass\n')
    assert len(_format_comparisons(probe)) == 2


def test_builtin_families_and_their_outputs() -> None:
    names = [f.name for f in registry.families() if f.distribution is None]
    assert names == ["safetensors", "torch", "dcp", "deepspeed-zero", "gguf"]
    assert registry.output_format_names()[:3] == ("safetensors", "torch", "dcp")
    kinds = {
        path: registry.output_for(path, fmt)[1].kind
        for path, fmt in [
            ("a.safetensors", None), ("a.pt", None), ("a.ckpt", None), ("a", None),
            ("a", "dcp"), ("run.v2", "dcp"), ("a", "safetensors"), ("a.bin", "torch"),
        ]
    }  # fmt: skip
    assert kinds == {
        "a.safetensors": "safetensors", "a.pt": "torch", "a.ckpt": "torch", "a": "folder",
        "run.v2": "dcp", "a.bin": "torch",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("path", "fmt", "needle"),
    [
        ("a.xyz", None, "unknown suffix"),
        ("a", "gguf", "output format 'gguf': one of safetensors, torch, dcp"),
        ("a", "nope", "output format 'nope'"),
        ("a.safetensors", "torch", "format torch writes one pickle file"),
        ("a.pt", "safetensors", "the .pt suffix names a torch pickle"),
        ("a.pt", "dcp", "format dcp writes a folder"),
    ],
)
def test_output_paths_that_do_not_fit_their_format(path: str, fmt: str | None, needle: str):
    with pytest.raises(UsageError, match=needle.replace(".", r"\.")):
        registry.output_for(path, fmt)
