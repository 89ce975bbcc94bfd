"""The wheel holds the package and nothing the repository keeps beside it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_holds_the_package_only(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("ckptsurgeon-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert "ckptsurgeon" in tops
    assert "ckptsurgeon/engine/plan.py" in names
    assert "ckptsurgeon/targets/check.py" in names
    assert "ckptsurgeon/py.typed" in names  # type checkers read the package's hints
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text
    assert "Provides-Extra: plot" in text and "Provides-Extra: gguf" in text
    requires = [line for line in text.splitlines() if line.startswith("Requires-Dist:")]
    assert not [r for r in requires if "safetensors" in r and "extra ==" not in r], requires
    assert not tops & {"rules", "examples", "tests", "benchmarks", "src"}, sorted(tops)
