"""Measuring a command the same way in every benchmark: wall time and peak RSS of the child."""

from __future__ import annotations

import json
import subprocess
import sys


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``cmd`` run in its own measuring process."""
    probe = (
        "import resource, subprocess, sys, time, json; t = time.perf_counter(); "
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "w = time.perf_counter() - t; "
        "print(json.dumps([p.returncode, w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.stderr[-2000:]]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True
    )
    code, wall, rss_kib, err = json.loads(out.stdout)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}): {err}")
    return wall, rss_kib * 1024


def spread(values: list[float], unit: str = "x") -> str:
    """``median (min-max over n rounds)``: the form every figure a benchmark reports takes,
    so that one noisy round can neither make nor break a claim."""
    import statistics

    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:.2f}{unit} ({low:.2f}-{high:.2f} over {len(values)} rounds)"
