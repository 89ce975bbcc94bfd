"""Shared fixtures: real checkpoints written by the real libraries, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# A BERT small enough for a test to build, save and run in well under a second.
TINY_BERT = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
}


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m ckptsurgeon ARGS`` in a subprocess, as a user would."""

    def run(*args: str, cwd: str | os.PathLike | None = None, timeout: float = 300):
        return subprocess.run(
            [sys.executable, "-m", "ckptsurgeon", *map(str, args)],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=timeout,
        )

    return run


def _pythonpath() -> list[str]:
    return [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where the README's example plug-in (examples/plugin) is installed for real:
    built as a wheel and installed by pip with ``--target``. Processes that put it on
    ``PYTHONPATH`` see the distribution, its metadata and entry points; this one does not."""
    work = tmp_path_factory.mktemp("plugin")
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "wheel"),
         str(REPO / "examples" / "plugin")],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (work / "wheel").glob("ckptsurgeon_npz-*.whl")
    site = work / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return site


@pytest.fixture
def run_with_plugin(plugin_site: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m ckptsurgeon ARGS`` with the example plug-in installed."""

    def run(*args: str, cwd: str | os.PathLike | None = None, timeout: float = 300):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), *_pythonpath()])}
        return subprocess.run(
            [sys.executable, "-m", "ckptsurgeon", *map(str, args)],
            capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env,
        )  # fmt: skip

    return run


def assert_clean_failure(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """A failure SPEC-style: the documented exit code, a message, and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip(), "expected a message on stderr"
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bit-exact values."""
    assert list(a) == list(b) or sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:10]
    for name in a:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype, (name, x.dtype, y.dtype)
        assert x.shape == y.shape, (name, x.shape, y.shape)
        assert torch.equal(
            x.view(torch.uint8) if x.dtype == torch.bool else x,
            y.view(torch.uint8) if y.dtype == torch.bool else y,
        ), name


def materialise(table) -> dict[str, torch.Tensor]:
    return {name: ref.load() for name, ref in table.items()}


@pytest.fixture(scope="session")
def resnet18_state() -> dict[str, torch.Tensor]:
    """A torchvision resnet18 (10 classes) state dict with non-trivial BN statistics."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))  # moves running stats away from their defaults
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ckpts")
