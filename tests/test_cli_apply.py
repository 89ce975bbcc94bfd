"""`apply`, `check`, `validate`, `schema` and `inspect` through the real CLI, as a user runs them."""

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

from ckptsurgeon.formats import open_checkpoint

RULES = """\
version: 1
source: src.pt
target:
  model: torch.nn:Linear
  kwargs: {in_features: 4, out_features: 2}
output: out.safetensors
rules:
  - op: strip_prefix
    prefix: "module."
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 2)
    torch.save({f"module.{k}": v for k, v in lin.state_dict().items()}, tmp_path / "src.pt")
    (tmp_path / "rules.yaml").write_text(RULES)
    return tmp_path


def test_apply_writes_and_reports(project: Path, run_cli) -> None:
    report = project / "report.json"
    proc = run_cli("apply", project / "rules.yaml", "--report", report, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert (project / "out.safetensors").exists()  # relative to the rules file, not the cwd
    data = json.loads(report.read_text())
    assert data["counts"]["stripped"] == 2 and data["check"]["ok"]
    assert data["written"]["path"].endswith("out.safetensors")


def test_dry_run_json_explains_every_key_and_writes_nothing(project: Path, run_cli) -> None:
    proc = run_cli("apply", project / "rules.yaml", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["dry_run"] is True
    assert {k["name"]: k["sources"] for k in report["keys"]} == {
        "weight": ["module.weight"],
        "bias": ["module.bias"],
    }
    assert all(k["actions"] == ["stripped from " + k["sources"][0]] for k in report["keys"])
    assert not (project / "out.safetensors").exists()


def test_overrides_resolve_against_the_working_directory(
    project: Path, run_cli, tmp_path_factory
) -> None:
    elsewhere = tmp_path_factory.mktemp("cwd")
    torch.save(
        {"module.weight": torch.zeros(2, 4), "module.bias": torch.zeros(2)}, elsewhere / "b.pt"
    )
    proc = run_cli(
        "apply", project / "rules.yaml", "--source", "b.pt", "--output", "o.pt", cwd=elsewhere
    )
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(torch.load(elsewhere / "o.pt")["weight"], torch.zeros(2, 4))


def test_target_mismatch_exits_1_and_writes_nothing(project: Path, run_cli) -> None:
    text = RULES.replace("out_features: 2", "out_features: 3")
    (project / "rules.yaml").write_text(text)
    proc = run_cli("apply", project / "rules.yaml")
    assert_clean_failure(
        proc, 1, "shape mismatch: weight: checkpoint [2, 4], target [3, 4]", "nothing was written"
    )
    assert not (project / "out.safetensors").exists()


def test_allow_unexpected_relaxes_the_check(project: Path, run_cli) -> None:
    torch.save(
        {
            "module.weight": torch.zeros(2, 4),
            "module.bias": torch.zeros(2),
            "module.extra": torch.zeros(1),
        },
        project / "src.pt",
    )
    proc = run_cli("apply", project / "rules.yaml")
    assert_clean_failure(proc, 1, "unexpected by the target (1): extra")
    (project / "rules.yaml").write_text(RULES + "check:\n  allow_unexpected: ['^extra$']\n")
    assert run_cli("apply", project / "rules.yaml").returncode == 0


def test_rule_matching_nothing_exits_1(project: Path, run_cli) -> None:
    (project / "rules.yaml").write_text(RULES.replace('prefix: "module."', 'prefix: "modle."'))
    assert_clean_failure(
        run_cli("apply", project / "rules.yaml"),
        1,
        "rules[0] (strip_prefix): prefix 'modle.' matched no key",
    )


def test_invalid_rules_name_file_line_and_field(project: Path, run_cli) -> None:
    bad = project / "bad.yaml"
    bad.write_text(
        RULES + "  - op: rename\n    pattern: '(unclosed'\n    replace: x\n"
        "  - op: drop\n    patern: x\n"
    )
    proc = run_cli("validate", bad)
    assert_clean_failure(
        proc,
        2,
        f"{bad}:11:5: rules[1] (rename).pattern: invalid regular expression",
        f"{bad}:14:5: rules[2] (drop).patern: unknown field",
    )
    assert_clean_failure(run_cli("apply", bad), 2, "invalid rules file")


def test_validate_and_schema(project: Path, run_cli) -> None:
    proc = run_cli("validate", project / "rules.yaml")
    assert proc.returncode == 0 and "valid (1 rules)" in proc.stdout
    schema = json.loads(run_cli("schema").stdout)
    ops = {
        v["properties"]["op"]["const"]
        for v in schema["$defs"].values()
        if "op" in v.get("properties", {})
    }
    assert {"strip_prefix", "split", "merge", "reinit_mismatched", "fill_missing"} <= ops
    assert schema["additionalProperties"] is False


def test_validate_schema_and_help_do_not_import_torch() -> None:
    code = textwrap.dedent("""
        import sys
        from click.testing import CliRunner
        from ckptsurgeon.cli import cli
        for args in (["--help"], ["schema"]):
            assert CliRunner().invoke(cli, args).exit_code == 0
        assert "torch" not in sys.modules, "torch was imported"
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "doc",
    [
        "a: &a ['x','x','x','x','x','x','x','x','x']\n"
        + "".join(
            f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
            for p, c in zip("abcdefgh", "bcdefghi", strict=True)
        ),
        "rules: " + "[" * 200 + "]" * 200,
    ],
)
def test_alias_bombs_and_absurd_documents_are_rejected_fast(
    tmp_path: Path, run_cli, doc: str
) -> None:
    (tmp_path / "bomb.yaml").write_text(doc)
    proc = run_cli("validate", tmp_path / "bomb.yaml", timeout=20)
    assert_clean_failure(proc, 2)


# Each is refused (exit 2) within a couple of seconds however it is built: the size cap,
# then a flat pass over the parser's events bounded by node count and depth, then the tree.
HOSTILE_RULES = {
    "billion-laughs": "a: &a ['x','x','x','x','x','x','x','x','x']\n"
    + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    ),
    "over-the-size-cap": "rules:\n" + "  - {op: drop, pattern: x}\n" * 60_000,
    "a-megabyte-of-block-scalars": "rules:\n" + "- x\n" * 249_000,
    "a-megabyte-of-flow-scalars": "rules: [" + "1," * 499_000 + "1]",
    "400k-deep-flow-nesting": "rules: " + "[" * 400_000 + "]" * 400_000,
    "deep-block-nesting": "".join("  " * i + "- \n" for i in range(2000)),
    "huge-mapping": "".join(f"k{i}: {i}\n" for i in range(110_000))[:999_000],
}


@pytest.mark.parametrize("case", list(HOSTILE_RULES))
def test_hostile_rules_files_are_rejected_within_two_seconds(tmp_path: Path, case: str) -> None:
    import time

    from click.testing import CliRunner

    from ckptsurgeon.cli import cli
    from ckptsurgeon.errors import RulesError
    from ckptsurgeon.rules.document import load_rules

    path = tmp_path / "hostile.yaml"
    path.write_text(HOSTILE_RULES[case])
    start = time.perf_counter()
    with pytest.raises(RulesError):
        load_rules(path)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"{case}: {elapsed:.2f} s"
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output


def test_cli_hostile_rules_files(tmp_path: Path, run_cli) -> None:
    """The real command on the two that used to be slowest (a megabyte of scalars took
    12-23 s) or escaped (400 000 nested brackets hit Python's recursion limit)."""
    import time

    for case in ("a-megabyte-of-flow-scalars", "400k-deep-flow-nesting"):
        path = tmp_path / f"{case}.yaml"
        path.write_text(HOSTILE_RULES[case])
        start = time.perf_counter()
        proc = run_cli("validate", path, timeout=60)
        assert time.perf_counter() - start < 5, case  # interpreter start-up included
        assert_clean_failure(proc, 2, str(path))


def test_check_command(project: Path, run_cli) -> None:
    out = project / "out.safetensors"
    assert run_cli("apply", project / "rules.yaml").returncode == 0
    ok = run_cli(
        "check",
        out,
        "--target",
        "torch.nn:Linear",
        "--kwargs",
        '{"in_features": 4, "out_features": 2}',
        "--json",
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    bad = run_cli(
        "check",
        project / "src.pt",
        "--target",
        "torch.nn:Linear",
        "--kwargs",
        '{"in_features": 4, "out_features": 2}',
    )
    assert bad.returncode == 1
    assert "missing from the checkpoint (2): weight, bias" in bad.stdout
    assert "unexpected by the target (2): module.{weight,bias}" in bad.stdout
    # a checkpoint or a manifest works as a target too
    manifest = project / "manifest.json"
    manifest.write_text(run_cli("inspect", out, "--json").stdout)
    assert run_cli("check", out, "--target", manifest).returncode == 0


def test_inspect_json_and_filter(project: Path, run_cli) -> None:
    proc = run_cli("inspect", project / "src.pt", "--json", "--filter", "weight$")
    data = json.loads(proc.stdout)
    assert data["format"] == "torch-zip"
    assert data["tensors"] == {"module.weight": {"shape": [2, 4], "dtype": "float32", "bytes": 32}}
    assert data["num_params"] == 8 and data["total_bytes"] == 32
    human = run_cli("inspect", project / "src.pt")
    assert "module.bias" in human.stdout and "10 parameters" in human.stdout.replace("(10)", "")


def test_convert_casts_floating_and_shards(tmp_path: Path, run_cli) -> None:
    torch.save({"w": torch.randn(1000), "n": torch.tensor(3)}, tmp_path / "in.pt")
    proc = run_cli(
        "convert",
        tmp_path / "in.pt",
        tmp_path / "out",
        "--dtype",
        "bf16",
        "--max-shard-size",
        "1KB",
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(run_cli("inspect", tmp_path / "out", "--json").stdout)
    assert data["format"] == "safetensors-sharded"
    assert data["tensors"]["w"]["dtype"] == "bfloat16" and data["tensors"]["n"]["dtype"] == "int64"


@pytest.mark.parametrize("dtype", ["int8", "bool", "qint8"])
def test_a_non_floating_dtype_is_refused(tmp_path: Path, run_cli, dtype: str) -> None:
    """Casting every floating tensor to an integer type would zero the weights."""
    torch.save({"w": torch.randn(10)}, tmp_path / "in.pt")
    proc = run_cli("convert", tmp_path / "in.pt", tmp_path / "o.safetensors", "--dtype", dtype)
    assert_clean_failure(proc, 2, "floating-point dtype")
    assert not (tmp_path / "o.safetensors").exists()
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"version: 1\nsource: in.pt\noutput: {{path: o.pt, dtype: {dtype}}}\nrules: []\n"
    )
    needles = ["dtype: unknown"] if dtype == "qint8" else ["not a floating-point dtype"]
    assert_clean_failure(run_cli("validate", rules), 2, *needles)


def test_python_api(project: Path) -> None:
    import ckptsurgeon

    report = ckptsurgeon.apply(project / "rules.yaml", dry_run=True)
    assert report["check"]["ok"]
    lazy = ckptsurgeon.load(project / "src.pt")
    assert sorted(lazy) == ["module.bias", "module.weight"]
    model = torch.nn.Linear(4, 2)
    ckptsurgeon.load_into(
        model, project / "src.pt", rules=[{"op": "strip_prefix", "prefix": "module."}]
    )
    assert torch.equal(model.weight, lazy["module.weight"])
    with pytest.raises(ckptsurgeon.FitError, match="missing from the checkpoint"):
        ckptsurgeon.load_into(torch.nn.Linear(4, 2), project / "src.pt")


def test_a_tensor_named_metadata_cannot_go_to_safetensors(tmp_path: Path, run_cli) -> None:
    """``__metadata__`` is a legal state-dict key but the safetensors header's own entry."""
    src = tmp_path / "odd.pt"
    torch.save({"__metadata__": torch.ones(2), "w": torch.zeros(3)}, src)
    for out in (tmp_path / "odd.safetensors", tmp_path / "folder"):
        proc = run_cli("convert", src, out)
        assert_clean_failure(proc, 1, "'__metadata__'", "rename it with a rule")
        assert not out.exists()
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"version: 1\nsource: {src}\noutput: {tmp_path / 'o.safetensors'}\nrules: []\n"
    )
    assert_clean_failure(run_cli("apply", rules, "--dry-run"), 1, "'__metadata__'")
    assert run_cli("convert", src, tmp_path / "fine.pt").returncode == 0


@pytest.mark.parametrize(
    ("rule", "needle"),
    [
        ("{op: reinit_mismatched, pattern: '^fc'}", "rules[0] (reinit_mismatched): needs a target"),
        ("{op: fill_missing, optional: true}", "rules[0] (fill_missing): needs a target"),
        (r"{op: rename, pattern: '^head\.(\w+)', replace: 'fc.\2'}", "invalid group reference 2"),
        (r"{op: copy, pattern: '^head', replace: '\g<x>'}", "unknown group name 'x'"),
        (r"{op: split, pattern: '^qkv', into: ['\1.q', k]}", "invalid group reference 1"),
    ],
)
def test_rules_that_could_only_fail_later_fail_validation(
    tmp_path: Path, run_cli, rule: str, needle: str
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"version: 1\nsource: x.pt\nrules:\n  - {rule}\n")
    assert_clean_failure(run_cli("validate", rules), 2, f"{rules}:4:", needle)


def test_absurd_sizes_are_a_clean_fit_error(project: Path, run_cli) -> None:
    rules = project / "rules.yaml"
    rules.write_text(
        RULES + "  - {op: reshape, pattern: 'weight', shape: [99999999999999999999999]}\n"
    )
    assert_clean_failure(run_cli("apply", rules, "--dry-run"), 1, "reshape")


def test_apply_takes_key_and_allow_global(project: Path, run_cli) -> None:
    """As every command that reads a checkpoint does (SPEC); --source replaces the file's
    whole source entry, so its key does not follow the path to another file."""
    import argparse

    state = torch.load(project / "src.pt", weights_only=True)
    ema = {k: v + 1 for k, v in state.items()}
    torch.save(
        {"state_dict": state, "state_dict_ema": ema, "args": argparse.Namespace(lr=1)},
        project / "train.pt",
    )
    rules = project / "rules.yaml"
    rules.write_text(RULES.replace("source: src.pt", "source: {path: train.pt, key: state_dict}"))
    out = project / "out.safetensors"
    assert_clean_failure(run_cli("apply", rules), 3, "--allow-global argparse.Namespace")
    proc = run_cli(
        "apply", rules, "--allow-global", "argparse.Namespace", "--key", "state_dict_ema", "-q"
    )
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(open_checkpoint(out).tensors["weight"].load(), ema["module.weight"])
    proc = run_cli("apply", rules, "--source", project / "src.pt", "-q")  # no state_dict there
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(open_checkpoint(out).tensors["weight"].load(), state["module.weight"])


def test_a_report_that_cannot_be_written_stops_the_run_first(project: Path, run_cli) -> None:
    rules = project / "rules.yaml"
    out = project / "out.safetensors"
    assert_clean_failure(
        run_cli("apply", rules, "--report", project / "nope" / "r.json"), 2, "no folder"
    )
    assert_clean_failure(run_cli("apply", rules, "--report", out), 2, "would overwrite the output")
    assert not out.exists()


def test_allow_global_reaches_a_reference_checkpoint_target(project: Path, run_cli) -> None:
    """``--allow-global`` names trusted classes: the --target checkpoint (or B) gets them too."""
    import argparse

    state = {"weight": torch.ones(2, 4), "bias": torch.zeros(2)}
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1)}, project / "ref.pth")
    torch.save(state, project / "mine.pt")
    flag = ("--allow-global", "argparse.Namespace")
    assert_clean_failure(run_cli("check", project / "mine.pt", "--target", project / "ref.pth"), 3)
    assert (
        run_cli("check", project / "mine.pt", "--target", project / "ref.pth", *flag).returncode
        == 0
    )
    assert run_cli("diff", project / "mine.pt", project / "ref.pth", *flag).returncode == 0


def test_report_is_written_through_links_and_pipes(project: Path, run_cli) -> None:
    rules = project / "rules.yaml"
    (project / "reports").mkdir()
    (project / "latest.json").symlink_to(project / "reports" / "r.json")
    assert run_cli("apply", rules, "--report", project / "latest.json").returncode == 0
    assert (project / "latest.json").is_symlink()
    assert json.loads((project / "reports" / "r.json").read_text())["check"]["ok"]
    os.mkfifo(project / "fifo")
    proc = subprocess.Popen(["cat", str(project / "fifo")], stdout=subprocess.PIPE)
    assert run_cli("apply", rules, "--report", project / "fifo").returncode == 0
    assert json.loads(proc.communicate(timeout=60)[0])["check"]["ok"]
    assert_clean_failure(run_cli("apply", rules, "--report", project / "reports"), 2, "is a folder")


def test_apply_allow_global_reaches_a_reference_checkpoint(project: Path, run_cli) -> None:
    import argparse

    import ckptsurgeon

    state = {"weight": torch.ones(2, 4), "bias": torch.zeros(2)}
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1)}, project / "ref.pth")
    rules = project / "rules.yaml"
    rules.write_text(
        RULES.replace(
            "  model: torch.nn:Linear\n  kwargs: {in_features: 4, out_features: 2}\n",
            "  checkpoint: ref.pth\n",
        )
    )
    flag = ("--allow-global", "argparse.Namespace")
    assert_clean_failure(run_cli("apply", rules, "--dry-run"), 3, "argparse.Namespace")
    assert run_cli("apply", rules, "--dry-run", *flag).returncode == 0
    report = ckptsurgeon.apply(rules, dry_run=True, allow_globals=["argparse.Namespace"])
    assert report["check"]["ok"]
