"""``strategy:`` presets and ``auto``: the expansions --dry-run prints, what each trains,
auto's measurement (train only, recorded), its fallback, bad input, factory datasets in
spawned DataLoader workers."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import test_finetune
import torch
from conftest import REPO, assert_clean_failure
from safetensors.torch import load_file, save_file
from test_finetune import quiet

from ckptsurgeon.finetune import probe
from ckptsurgeon.finetune.layout import layout
from ckptsurgeon.finetune.runner import Runtime, run_finetune
from ckptsurgeon.finetune.strategy import expand
from ckptsurgeon.rules.finetune import FinetuneSpec, FreezeSpec

sys.path.insert(0, str(REPO / "rules"))
from models import digits_cnn

CPU = Runtime(torch.device("cpu"), None)
# The fine-tune tests' digits-shaped tensors (64 train, 32 val, 2 classes), reused.
data = test_finetune.data


def strategy_spec(strategy: str, **overrides: Any) -> FinetuneSpec:
    """The ``data`` fixture's files, trained by ``strategy`` for 5 epochs at head LR 0.05."""
    base = {
        "data": {"train": {"tensors": "train.safetensors"}, "val": {"tensors": "val.safetensors"}},
        "strategy": strategy,
        "epochs": 5,
        "lr": 0.05,
        "batch_size": 16,
        "output_dir": "run",
    }
    return FinetuneSpec.model_validate({**base, **overrides})


def rules_file(folder: Path, finetune: str) -> Path:
    """A rules file: no surgery on the digits CNN in init.pt, then ``finetune`` (YAML lines
    indented under ``finetune:``, the data section given). init.safetensors, the output
    ``apply`` writes, is there already, so ``finetune`` can run alone."""
    torch.manual_seed(0)
    state = digits_cnn(2).state_dict()
    torch.save({"model": state}, folder / "init.pt")
    save_file(state, folder / "init.safetensors")
    path = folder / "ft.yaml"
    path.write_text(f"""\
version: 1
source: {{path: init.pt, key: model}}
target: {{model: {REPO / "rules" / "models.py"}:digits_cnn, kwargs: {{num_classes: 2}}}}
output: init.safetensors
rules: []
finetune:
  data: {{train: {{tensors: train.safetensors}}, val: {{tensors: val.safetensors}}}}
  batch_size: 16
  output_dir: run
{finetune}""")
    return path


def test_each_preset_expands_into_the_documented_freeze_and_phases() -> None:
    lay = layout(digits_cnn(2), FreezeSpec())
    assert lay.head == ["^fc\\."]
    assert lay.blocks == ["features.0", "features.1", "features.3", "features.4"]
    head_only = expand("head_only", 10, 0.05, lay)
    assert [(p.epochs, p.frozen, p.unfreeze) for p in head_only.phases] == [(10, True, [])]
    assert head_only.freeze.modules == lay.blocks and head_only.freeze.except_ == lay.head
    partial = expand("partial", 10, 0.05, lay)
    assert partial.freeze_depth == 2  # the lower half
    assert [(p.epochs, p.frozen, p.unfreeze) for p in partial.phases] == [
        (2, True, []),
        (8, True, ["features.3", "features.4"]),
    ]
    full = expand("full", 10, 0.05, lay)
    assert [(p.epochs, p.frozen, p.backbone_lr_scale) for p in full.phases] == [
        (2, True, 1.0),
        (8, False, 0.1),
    ]
    scratch = expand("scratch", 10, 0.05, lay)
    assert scratch.reinitialise and [(p.epochs, p.frozen) for p in scratch.phases] == [(10, False)]
    assert expand("partial", 10, 0.05, lay, freeze_depth=3).phases[1].unfreeze == ["features.4"]


def test_dry_run_prints_the_expansion_and_trains_nothing(data: Path, run_cli) -> None:
    rules = rules_file(data, "  strategy: partial\n  epochs: 10\n  lr: 0.05\n")
    proc = run_cli("finetune", rules, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("finetune strategy: partial (head: ^fc\\.; backbone blocks: ")
    assert "frozen_blocks: [features.0, features.1]" in out
    assert "unfreeze: [features.3, features.4]" in out and "epochs: 8" in out
    assert not (data / "run").exists()

    rules = rules_file(data, "  strategy: auto\n  epochs: 10\n  lr: 0.05\n")
    proc = run_cli("apply", rules, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    for case in ("little data, similar domain: head_only", "much data, different domain: scratch"):
        assert f"# if {case}" in proc.stdout, proc.stdout
    assert "# measured when the run starts: examples per class" in proc.stdout
    assert not (data / "run").exists()


def test_presets_train_what_they_expand_to(data: Path) -> None:
    torch.manual_seed(0)
    start = digits_cnn(2).state_dict()
    trained = {}
    for name in ("head_only", "partial", "full"):
        model = digits_cnn(2)
        model.load_state_dict(start)
        summary = run_finetune(
            strategy_spec(name, epochs=2, output_dir=name), model, base_dir=str(data), log=quiet
        )
        assert summary["strategy"]["chosen"] == name
        assert summary["strategy"]["reason"] == "set in the rules file"
        trained[name] = load_file(data / name / "last.safetensors")

    def moved(name: str, key: str) -> bool:
        return not torch.equal(trained[name][key], start[key])

    assert moved("head_only", "fc.weight") and not moved("head_only", "features.0.weight")
    assert not moved("head_only", "features.1.running_mean")  # frozen BN stays in eval
    assert not moved("partial", "features.0.weight") and not moved("partial", "features.1.weight")
    assert moved("partial", "features.3.weight") and moved("partial", "features.4.running_mean")
    assert moved("full", "features.0.weight") and moved("full", "features.1.running_mean")
    lines = [json.loads(x) for x in (data / "full" / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["group_lrs"]["backbone.decay"] == pytest.approx(
        0.1 * lines[1]["group_lrs"]["head.decay"]
    )


def test_scratch_does_not_use_the_pretrained_weights(data: Path) -> None:
    model = digits_cnn(2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)  # "pretrained": far from any initialisation
    spec = strategy_spec("scratch", epochs=1, lr=1e-6)
    summary = run_finetune(spec, model, base_dir=str(data), log=quiet, fresh=lambda: digits_cnn(2))
    assert summary["strategy"]["expansion"]["reinitialise"] is True
    after = load_file(data / "run" / "last.safetensors")
    assert not torch.allclose(
        after["features.0.weight"], torch.full_like(after["features.0.weight"], 0.5)
    )


def _separable(per_class: int, informative: bool, seed: int = 0, shuffled: float = 1.0) -> Any:
    """Two classes of 8x8 images: the label is which way the pixels are shifted, or (not
    informative) for a ``shuffled`` share of the images a coin flip they say nothing about."""
    from torch.utils.data import TensorDataset

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * per_class, 1, 8, 8, generator=gen)
    x[:per_class] += 1.0
    x[per_class:] -= 1.0
    y = torch.arange(2).repeat_interleave(per_class)
    if not informative:
        flip = torch.rand(len(y), generator=gen) < shuffled
        y = torch.where(flip, torch.randint(0, 2, (len(y),), generator=gen), y)
    dataset = TensorDataset(x, y)
    dataset.targets = y  # type: ignore[attr-defined]  (what labels_of reads first)
    return dataset


@pytest.mark.parametrize(
    ("per_class", "informative", "chosen"),
    [(30, True, "head_only"), (30, False, "partial"), (150, True, "full"), (150, False, "scratch")],
)
def test_auto_picks_the_case_its_measurements_say(
    per_class: int, informative: bool, chosen: str
) -> None:
    torch.manual_seed(0)
    model = digits_cnn(2)
    lay = layout(model, FreezeSpec())
    choice = probe.measure(
        model, _separable(per_class, informative), lay, strategy_spec("auto"), CPU
    )
    m = choice.measurements
    assert choice.strategy == chosen, choice.reason
    assert m["examples_per_class_median"] == per_class and m["classes"] == 2
    assert m["probe_fit"] + m["probe_held_out"] == 2 * per_class
    depths = [s["depth"] for s in m["probe"]]
    assert depths == ["features.0", "features.1", "features.3", "features.4", "head input"]
    head = m["probe"][-1]["separability"]
    assert (head >= probe.SIMILAR_SEPARABILITY) == informative
    assert (choice.freeze_depth is not None) == (chosen == "partial")
    assert chosen in choice.reason and f"{per_class:g} examples per class" in choice.reason


def test_auto_takes_scratch_over_partial_when_pretraining_does_not_help() -> None:
    """Little data, different domain: partial, unless an untrained copy of the network
    separates the classes as well as the pretrained one (then its layers know nothing)."""
    torch.manual_seed(0)
    model = digits_cnn(2)
    train, spec = _separable(30, informative=False), strategy_spec("auto")
    lay = layout(model, FreezeSpec())
    same = probe.measure(model, train, lay, spec, CPU, untrained=lambda: copy.deepcopy(model))
    assert same.strategy == "scratch" and same.case == "little data, different domain"
    assert "no pretrained depth separates better than the untrained network" in same.reason
    assert same.measurements["untrained_probe"] == same.measurements["probe"]

    def blind() -> torch.nn.Module:  # every feature constant: it separates nothing
        untrained = copy.deepcopy(model)
        with torch.no_grad():
            for p in untrained.features.parameters():
                p.zero_()
        return untrained

    # Labels half informative: the features separate them, not well enough for "similar".
    train = _separable(30, informative=False, shuffled=0.6)
    kept = probe.measure(model, train, lay, spec, CPU, untrained=blind)
    assert kept.case == "little data, different domain", kept.reason
    assert kept.strategy == "partial" and kept.freeze_depth is not None, kept.reason
    train = _separable(30, informative=True)
    calls: list[int] = []
    similar = probe.measure(model, train, lay, spec, CPU, untrained=lambda: calls.append(1))
    assert similar.strategy == "head_only" and not calls  # only partial asks for the copy


def test_auto_run_records_its_numbers_reason_and_cost(data: Path, run_cli) -> None:
    rules = rules_file(data, "  strategy: auto\n  epochs: 3\n  lr: 0.05\n")
    proc = run_cli("apply", rules)  # the surgery writes init.safetensors, then the fine-tune
    assert proc.returncode == 0, proc.stderr
    assert "strategy auto: 32 examples per class (median) < 100: little data" in proc.stdout
    assert "probe head input (1024 features): held-out accuracy" in proc.stdout
    record = json.loads((data / "run" / "summary.json").read_text())["strategy"]
    # init.pt is the untrained network itself (digits_cnn, seed 0, as the untrained copy
    # auto builds): its features cannot beat themselves, so partial becomes scratch.
    assert record["strategy"] == "auto" and record["chosen"] == "scratch", record["reason"]
    assert record["case"] == "little data, different domain" and record["fallback"] is None
    assert record["measurements"]["untrained_probe"] == record["measurements"]["probe"]
    assert record["measurements"]["examples"] == 64
    assert [s["depth"] for s in record["measurements"]["probe"]][-1] == "head input"
    assert 0 < record["measure_seconds"] < record["run_seconds"]
    assert record["measure_fraction"] == pytest.approx(
        record["measure_seconds"] / record["run_seconds"], abs=1e-3
    )
    assert record["expansion"]["strategy"] == record["chosen"]


def test_auto_never_looks_at_the_validation_set(data: Path) -> None:
    records = []
    for flip in (False, True):
        if flip:  # the same validation images, every label changed
            val = load_file(data / "val.safetensors")
            save_file({"x": val["x"], "y": 1 - val["y"]}, data / "val.safetensors")
        torch.manual_seed(0)
        spec = strategy_spec("auto", epochs=1, output_dir=f"run_{flip}")
        summary = run_finetune(spec, digits_cnn(2), base_dir=str(data), log=quiet)
        records.append(summary["strategy"])
    assert records[0]["measurements"] == records[1]["measurements"]
    assert records[0]["chosen"] == records[1]["chosen"]


def test_auto_falls_back_when_train_is_too_small_to_hold_out(data: Path) -> None:
    train = load_file(data / "train.safetensors")
    keep = torch.cat([torch.nonzero(train["y"] == c).flatten()[:3] for c in (0, 1)])
    save_file({"x": train["x"][keep], "y": train["y"][keep]}, data / "train.safetensors")
    lines: list[str] = []
    summary = run_finetune(
        strategy_spec("auto", epochs=1), digits_cnn(2), base_dir=str(data), log=lines.append
    )
    record = summary["strategy"]
    assert record["chosen"] == probe.FALLBACK == "head_only"
    assert "3 examples in its smallest class" in record["fallback"]
    assert record["case"] is None and "probe" not in record["measurements"]
    on_disk = json.loads((data / "run" / "summary.json").read_text())["strategy"]
    assert on_disk["fallback"] == record["fallback"]
    assert any("falling back to head_only" in line for line in lines), lines


@pytest.mark.parametrize(
    ("finetune", "needle"),
    [
        (
            "  strategy: full\n  epochs: 3\n  lr: 0.05\n  phases:\n"
            "    - {epochs: 3, frozen: false, lr: 0.05}\n",
            "ft.yaml:13:3: finetune.phases: strategy: full expands into its own phases",
        ),
        (
            "  freeze: {modules: [features]}\n  phases:\n"
            "    - {epochs: 1, frozen: false, lr: 0.05, layer_decay: 1.5}\n",
            "ft.yaml:12:44: finetune.phases[0].layer_decay: Input should be less than or equal to 1",
        ),
        (
            "  freeze: {modules: [features]}\n  phases:\n"
            "    - {epochs: 1, frozen: true, unfreeze: [features.9], lr: 0.05}\n",
            "finetune.phases[0]: unfreeze 'features.9' names no module",
        ),
        (
            "  strategy: partial\n  freeze_depth: 4\n  epochs: 3\n  lr: 0.05\n",
            "freeze_depth: 4, but the backbone has 4 blocks",
        ),
    ],
    # (unfreeze outside the backbone: test_finetune.py, in process)
    ids=["strategy-and-phases", "layer-decay", "unfreeze-missing", "depth"],
)
def test_bad_input_is_one_clear_line_and_exit_2(
    data: Path,
    run_cli,
    finetune: str,
    needle: str,
) -> None:
    proc = run_cli("finetune", rules_file(data, finetune))
    assert_clean_failure(proc, 2, needle)
    assert len(proc.stderr.strip().splitlines()) <= 2  # "invalid rules file:" + the line


def test_factory_dataset_trains_with_spawned_workers(tmp_path: Path) -> None:
    """A file.py:callable dataset's class lives in a module no worker can import by name;
    under spawn (and forkserver) the workers unpickle it all the same."""
    (tmp_path / "factory.py").write_text("""\
import torch
from torch.utils.data import Dataset


class Noise(Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 8, 8, generator=g)
        self.targets = (self.x.mean(dim=(1, 2, 3)) > 0).long()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def make(n):
    return Noise(n)
""")
    script = f"""\
import multiprocessing, sys
sys.path.insert(0, {str(REPO / "rules")!r})
if __name__ == "__main__":
    multiprocessing.set_start_method("spawn", force=True)
    from models import digits_cnn
    from ckptsurgeon.finetune.runner import run_finetune
    from ckptsurgeon.rules.finetune import FinetuneSpec
    spec = FinetuneSpec.model_validate({{
        "data": {{"train": {{"factory": "factory.py:make", "kwargs": {{"n": 32}},
                             "augments": False}},
                 "num_workers": 1}},
        "strategy": "full", "epochs": 1, "lr": 0.01, "batch_size": 16, "output_dir": "run",
        "cache_features": False,
    }})
    summary = run_finetune(spec, digits_cnn(2), base_dir={str(tmp_path)!r}, log=print)
    print("epochs", summary["epochs"])
"""
    (tmp_path / "go.py").write_text(script)
    proc = subprocess.run(
        [sys.executable, "go.py"], cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epochs 1" in proc.stdout
