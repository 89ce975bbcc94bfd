"""What a fine-tune leaves behind and how a run says so: the files in its output folder,
the best epoch, ``summary.json``'s ``best``/``files`` and the closing lines.

Every path here is the output folder's real path (:func:`os.path.realpath`) joined to a
file name: absolute, without ``..`` and with symbolic links resolved, so that
``summary.json``, the ``--json`` result and the closing lines name a file the same way
however the rules file was reached (``rules/../examples/out`` is ``examples/out``, and a
lexical ``normpath`` would get ``link/..`` wrong when ``link`` is a symbolic link).
"""

from __future__ import annotations

import os
from typing import Any

from ckptsurgeon.finetune.state import STATE_FILE

BEST = "best.safetensors"
LAST = "last.safetensors"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CURVES = "curves.png"

# The order files are listed in: summary.json's ``files`` and the closing lines.
FILES = {
    "best": BEST,
    "last": LAST,
    "summary": SUMMARY,
    "curves": CURVES,
    "metrics": METRICS,
    "state": STATE_FILE,
}


def real_dir(path: str, base_dir: str) -> str:
    """Where ``path`` (``~`` expanded; relative: to ``base_dir``) is, as
    :func:`os.path.realpath` spells it. Not :func:`ckptsurgeon.paths.resolve`: its
    ``normpath`` drops ``link/..`` before the links are resolved."""
    return os.path.realpath(os.path.join(base_dir, os.path.expanduser(path)))


def scored(m: dict[str, Any]) -> tuple[str, float]:
    """The metric an epoch is judged by and its value: ``val_acc``, else ``val_loss``,
    else ``train_loss`` (losses: lower is better)."""
    for name in ("val_acc", "val_loss"):
        if m.get(name) is not None:
            return name, m[name]
    return "train_loss", m["train_loss"]


def score(m: dict[str, Any]) -> float:
    """Higher is better: the accuracy, or the negated loss (see :func:`scored`)."""
    name, value = scored(m)
    return value if name == "val_acc" else -value


def best_epoch(metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The epoch whose weights are in ``best.safetensors``: the runner writes them when an
    epoch's score beats every earlier one, so the first epoch with the highest score (None
    when no epoch scored above -inf, e.g. every loss NaN: no best weights written)."""
    best, record = -float("inf"), None
    for m in metrics:
        if score(m) > best:
            best = score(m)
            metric, value = scored(m)
            record = {"epoch": m["epoch"], "metric": metric, "value": value}
    return record


def files(output_dir: str, metrics: list[dict[str, Any]], curves: bool) -> dict[str, str | None]:
    """Each file's path under ``output_dir`` (a real path), None where the run has none:
    ``best`` when no epoch scored, ``last``/``metrics``/``state`` before any epoch,
    ``curves`` when it was not plotted."""
    written = {
        "best": best_epoch(metrics) is not None,
        "last": bool(metrics),
        "summary": True,
        "curves": curves,
        "metrics": bool(metrics),
        "state": bool(metrics),
    }
    return {
        key: os.path.join(output_dir, name) if written[key] else None for key, name in FILES.items()
    }


def _scored_text(metric: str, value: float) -> str:
    return f"{metric} {value:.4f}"


def closing_lines(summary: dict[str, Any]) -> list[str]:
    """The lines a run ends with (rank 0): where the best and last weights, the summary
    and the curves went, the best epoch and its score, and why a file is missing."""
    paths = summary["files"]
    best = summary.get("best")
    final = summary.get("final")
    epochs = summary["epochs"]
    lines = [
        f"fine-tune finished: {epochs} epoch{'s' * (epochs != 1)} in {summary['seconds']:.2f} s"
    ]

    def line(label: str, key: str, detail: str = "", missing: str = "not written") -> None:
        path = paths.get(key)
        if path:
            text = f"{path} ({detail})" if detail else path
        else:
            text = missing
            if os.path.exists(os.path.join(summary["output_dir"], FILES[key])):
                text += f"; the {FILES[key]} there is an earlier run's"
        lines.append(f"  {label + ':':<9}{text}")

    line(
        "best",
        "best",
        f"epoch {best['epoch']}, {_scored_text(best['metric'], best['value'])}" if best else "",
        "not written (no epoch had a finite score)",
    )
    line(
        "last",
        "last",
        f"epoch {final['epoch']}, {_scored_text(*scored(final))}" if final else "",
        "not written (no epoch ran)",
    )
    line("summary", "summary")
    line("curves", "curves", missing=f"not written ({summary.get('curves_not_written', '?')})")
    return lines
