"""Every bundled rules file runs as the README says, in a copy of the repository's layout.

The README's steps are run as a new user runs them, as subprocesses from the copy's root:
the example-making scripts, then ``ckptsurgeon apply rules/X.yaml`` for every ``rules/*.yaml``
(found by glob, so a new file is covered without editing this test), nothing overridden on
the command line. Each must exit 0 and write its output. The scripts must print only their
own lines (what they wrote, where), none of the libraries' notes, warnings or progress bars.
Every rules file must also be listed in the README's "Example rules files" table.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import REPO

RULES = sorted((REPO / "rules").glob("*.yaml"))
# The README's steps that make the examples' inputs, in its order. make_checkpoints.py makes
# them all; make_lora.py and make_combine.py (documented too) make theirs again, the same.
# make_hf_cache.py lays out the Hugging Face cache of minilm_to_classifier.yaml, which the
# README reads with `export HF_HUB_CACHE=examples/hf_cache`.
SCRIPTS = ("make_checkpoints.py", "make_lora.py", "make_combine.py", "make_hf_cache.py")
HF_HUB_CACHE = "examples/hf_cache"
# Settings that would silence for the scripts what they must silence themselves, and a hub
# cache of the caller's own: the subprocesses run without them.
NOT_PASSED = ("TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "TQDM_DISABLE",
              "HF_HUB_DISABLE_PROGRESS_BARS", "DS_ACCELERATOR", "PYTHONWARNINGS",
              "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")  # fmt: skip
# What the libraries print when left alone: logs, warnings, tips, progress bars, tracebacks.
NOISE = re.compile(r"WARNING|Warning|Tip|it/s\]|s/it\]|\d%\||available: |Traceback")


def _ignore_outputs(folder: str, names: list[str]) -> set[str]:
    """What copytree leaves behind: caches, builds and the examples' outputs (made again)."""
    ignored = {n for n in names if n in ("__pycache__", "build") or n.endswith(".egg-info")}
    if Path(folder) == REPO / "examples":
        ignored |= {"checkpoints", "out", "hf_cache"} & set(names)
    return ignored


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """rules/ and examples/ as in a fresh clone, without the examples' outputs."""
    root = tmp_path.resolve()  # the scripts print resolved paths
    for name in ("rules", "examples"):
        shutil.copytree(REPO / name, root / name, ignore=_ignore_outputs)
    assert not (root / "examples" / "checkpoints").exists()
    return root


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in NOT_PASSED}


def _run(cwd: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _assert_own_lines_only(script: str, proc: subprocess.CompletedProcess[str], root: Path):
    """Exit 0, nothing on stderr, and each stdout line names a file or folder it wrote."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, (script, out)
    assert not NOISE.search(out), (script, out)
    assert proc.stderr == "", (script, proc.stderr)
    lines = proc.stdout.splitlines()
    assert lines, script
    for line in lines:
        written = Path(line.rsplit(": ", 1)[-1])  # "name: path" or "path"
        assert written.is_relative_to(root) and written.exists(), (script, line)


def _outputs(rules: Path) -> list[Path]:
    """The rules file's output, and its fine-tune's output_dir if it has one (relative paths
    resolve against the rules file's folder)."""
    doc = yaml.safe_load(rules.read_text())
    output = doc["output"]["path"] if isinstance(doc["output"], dict) else doc["output"]
    paths = [output]
    if "finetune" in doc and "output_dir" in doc["finetune"]:
        paths.append(doc["finetune"]["output_dir"])
    return [(rules.parent / p).resolve() for p in paths]


def _workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(2, min(4, cores or 1))


def _apply_in_turn(root: Path, names: list[str], env: dict[str, str]) -> list[tuple]:
    """``ckptsurgeon apply rules/NAME`` for each of ``names``, one after another; returns
    (name, seconds, failure or None) for each."""
    results = []
    for name in names:
        start = time.perf_counter()
        proc = _run(root, "-m", "ckptsurgeon", "apply", f"rules/{name}", env=env)
        failure = None
        if proc.returncode != 0:
            failure = (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
        else:
            missing = [str(p) for p in _outputs(root / "rules" / name) if not p.exists()]
            failure = ("exit 0 but no output", missing) if missing else None
        results.append((name, round(time.perf_counter() - start, 1), failure))
    return results


def test_every_rules_file_runs_as_the_readme_says(project: Path) -> None:
    env = _env()
    # make_checkpoints.py first; the others make disjoint files, the same again (run
    # side by side to save time: each is mostly its imports).
    first, *rest = SCRIPTS
    _assert_own_lines_only(first, _run(project, f"examples/{first}", env=env), project)
    with ThreadPoolExecutor(_workers()) as pool:
        procs = pool.map(lambda s: _run(project, f"examples/{s}", env=env), rest)
        for script, proc in zip(rest, procs, strict=True):
            _assert_own_lines_only(script, proc, project)

    env["HF_HUB_CACHE"] = HF_HUB_CACHE  # the README's export, before minilm_to_classifier
    # Side by side too, but files that write the same output one after another.
    by_output: dict[Path, list[str]] = {}
    for rules in RULES:
        by_output.setdefault(_outputs(project / "rules" / rules.name)[0], []).append(rules.name)
    with ThreadPoolExecutor(_workers()) as pool:
        runs = [r for group in pool.map(
            lambda names: _apply_in_turn(project, names, env), by_output.values()
        ) for r in group]  # fmt: skip
    assert len(runs) == len(RULES)
    print({name: seconds for name, seconds, _ in runs})  # with -s: which files take the time
    failures = [(f"rules/{name}", failure) for name, _, failure in runs if failure]
    assert not failures, failures


def readme_listed(readme: str) -> set[str]:
    """The rules files the README's "Example rules files" table lists (first column)."""
    section = readme.split("\n## Example rules files\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(rules/[\w.-]+\.yaml)` \|", section, re.MULTILINE))


def test_every_rules_file_is_in_the_readme_table() -> None:
    listed = readme_listed((REPO / "README.md").read_text())
    bundled = {f"rules/{rules.name}" for rules in RULES}
    assert bundled - listed == set(), "not in README.md's Example rules files table"
    assert listed - bundled == set(), "listed in README.md but not in rules/"
