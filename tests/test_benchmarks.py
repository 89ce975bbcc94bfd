"""The benchmark scripts stay runnable; CI checks their outputs for correctness, not speed."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_streaming_benchmark_outputs_are_exact() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_streaming.py"), "--verify-only"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified: rename and cast outputs are exact" in proc.stdout


def test_gpu_bench_runs_on_cpu() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_bench.py"),
            "--device",
            "cpu",
            "--arch",
            "resnet18",
            "--size",
            "32",
            "--batch",
            "4",
            "--steps",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| frozen backbone |" in proc.stdout


def test_verify_benchmark_runs_and_verifies() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_verify.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "verified: ok=True" in proc.stdout
