"""The fine-tune runner: freezing, BatchNorm, optimizer groups, caching, resume, DDP, CUDA."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_clean_failure
from safetensors.torch import load_file, save_file

from ckptsurgeon.finetune.freeze import backbone_names, set_frozen
from ckptsurgeon.finetune.runner import param_groups, run_finetune
from ckptsurgeon.rules.finetune import FinetuneSpec, FreezeSpec, PhaseSpec

sys.path.insert(0, str(REPO / "rules"))
from models import digits_cnn

FREEZE = {"modules": ["features"], "except": ["^fc\\."]}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=gen)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    save_file({"x": x[:64].contiguous(), "y": y[:64].contiguous()}, tmp_path / "train.safetensors")
    save_file({"x": x[64:].contiguous(), "y": y[64:].contiguous()}, tmp_path / "val.safetensors")
    return tmp_path


def spec(tmp: Path, **overrides) -> FinetuneSpec:
    base = {
        "data": {"train": {"tensors": "train.safetensors"}, "val": {"tensors": "val.safetensors"}},
        "freeze": FREEZE,
        "phases": [
            {"epochs": 2, "frozen": True, "lr": 0.05},
            {"epochs": 2, "frozen": False, "lr": 0.01, "backbone_lr_scale": 0.1},
        ],
        "batch_size": 16,
        "output_dir": "run",
        "optimizer": {"name": "sgd", "momentum": 0.9, "weight_decay": 1e-4},
    }
    return FinetuneSpec.model_validate({**base, **overrides})


def quiet(*_args) -> None:
    pass


def test_freeze_selection_by_modules_patterns_children_and_except() -> None:
    model = digits_cnn(2)
    assert backbone_names(model, FreezeSpec(modules=["features"])) == {
        n for n, _ in model.named_parameters() if n.startswith("features.")
    }
    by_child = backbone_names(model, FreezeSpec(first_children=1))
    assert by_child == backbone_names(model, FreezeSpec(modules=["features"]))
    by_pattern = backbone_names(
        model, FreezeSpec.model_validate({"patterns": [r"^features\.0\."], "except": [r"bias$"]})
    )
    assert by_pattern == {"features.0.weight"}


BATCHNORMS = ("features.1", "features.4")
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def bn_statistics(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{m}.{s}": state[f"{m}.{s}"].clone() for m in BATCHNORMS for s in STATISTICS}


def test_frozen_batchnorm_stays_in_eval_even_after_parent_train() -> None:
    model = digits_cnn(2)
    backbone = backbone_names(model, FreezeSpec(modules=["features"]))
    locked = set_frozen(model, backbone, frozen=True, train_bn=False)
    assert locked == ["features.1", "features.4"]
    before = model.features[1].running_mean.clone()
    statistics = bn_statistics(model.state_dict())
    model.train()  # a parent's train() must not switch the frozen BN back
    assert not model.features[1].training and model.fc.training
    model(torch.randn(8, 1, 8, 8))
    assert torch.equal(model.features[1].running_mean, before)
    for name, value in bn_statistics(model.state_dict()).items():
        assert torch.equal(value, statistics[name]), name
    assert not any(p.requires_grad for p in model.features.parameters())
    set_frozen(model, backbone, frozen=False, train_bn=False)  # unfreezing releases the lock
    model.train()
    assert model.features[1].training
    model(torch.randn(8, 1, 8, 8))
    assert not torch.equal(model.features[1].running_mean, before)


def test_train_bn_true_lets_statistics_move() -> None:
    torch.manual_seed(0)
    model = digits_cnn(2)
    backbone = backbone_names(model, FreezeSpec(modules=["features"]))
    assert set_frozen(model, backbone, frozen=True, train_bn=True) == []
    before = bn_statistics(model.state_dict())
    model.train()
    assert all(model.get_submodule(m).training for m in BATCHNORMS)
    model(torch.randn(8, 1, 8, 8) * 3 + 1)
    after = bn_statistics(model.state_dict())
    for name in before:
        assert not torch.equal(after[name], before[name]), f"{name} did not move"
    assert not any(p.requires_grad for p in model.features.parameters())  # still frozen


@pytest.mark.parametrize("train_bn", [True, False], ids=["train_bn", "locked"])
def test_a_frozen_phase_moves_bn_statistics_only_with_train_bn(data: Path, train_bn: bool) -> None:
    """The runner's frozen phase: the backbone's weights stay bit for bit either way; its
    BatchNorm statistics follow the training data with train_bn, and stay bit for bit
    without it."""
    torch.manual_seed(0)
    model = digits_cnn(2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    s = spec(
        data,
        freeze={**FREEZE, "train_bn": train_bn},
        phases=[{"epochs": 1, "frozen": True, "lr": 0.05}],
        cache_features=False,
    )
    run_finetune(s, model, base_dir=str(data), log=quiet)
    after = load_file(data / "run" / "last.safetensors")
    statistics = bn_statistics(start)
    for name, value in start.items():
        if not name.startswith("features."):
            continue
        moved = not torch.equal(after[name], value)
        assert moved == (train_bn and name in statistics), name
    assert not torch.equal(after["fc.weight"], start["fc.weight"])  # the head trained


def test_optimizer_groups_scale_backbone_lr_and_skip_decay_on_biases_and_norms() -> None:
    model = digits_cnn(2)
    backbone = backbone_names(model, FreezeSpec(modules=["features"]))
    set_frozen(model, backbone, frozen=True, train_bn=False)
    frozen = param_groups(model, backbone, PhaseSpec(epochs=1, lr=0.1), 1e-4, False)
    assert [g["name"] for g in frozen] == ["head.decay", "head.no_decay"]  # only trainable params
    set_frozen(model, backbone, frozen=False, train_bn=False)
    groups = {
        g["name"]: g
        for g in param_groups(
            model,
            backbone,
            PhaseSpec(epochs=1, lr=0.1, frozen=False, backbone_lr_scale=0.1),
            1e-4,
            False,
        )
    }
    assert groups["backbone.decay"]["lr"] == pytest.approx(0.01)
    assert groups["head.decay"]["lr"] == pytest.approx(0.1)
    assert groups["backbone.no_decay"]["weight_decay"] == 0.0  # BN weights and biases
    assert all(p.ndim == 1 for p in groups["backbone.no_decay"]["params"])


def test_run_writes_metrics_weights_state_and_summary(data: Path) -> None:
    torch.manual_seed(0)
    model = digits_cnn(2)
    frozen_before = {k: v.clone() for k, v in model.features.state_dict().items()}
    summary = run_finetune(spec(data), model, base_dir=str(data), log=quiet)
    run = data / "run"
    image = pytest.importorskip("matplotlib.image").imread(run / "curves.png")
    assert image.shape[:2] == (350, 900) and image.std() > 0  # drawn, not blank
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4] and [m["phase"] for m in lines] == [
        1,
        1,
        2,
        2,
    ]
    assert set(lines[0]) >= {
        "phase",
        "epoch",
        "train_loss",
        "val_loss",
        "val_acc",
        "lr",
        "trainable_params",
        "seconds",
    }
    assert 0.0 <= lines[-1]["val_acc"] <= 1.0
    assert lines[0]["trainable_params"] == 2050 and lines[2]["trainable_params"] > 2050
    assert summary["epochs"] == 4
    for name in ("last.safetensors", "best.safetensors", "state.pt", "summary.json"):
        assert (run / name).exists(), name
    # phase 1 froze the backbone (BN statistics included); phase 2 trained it
    after = load_file(run / "last.safetensors")
    assert not torch.equal(after["features.0.weight"], frozen_before["0.weight"])


def test_cached_features_give_the_same_result(data: Path) -> None:
    results = []
    for cache in (True, False):
        torch.manual_seed(0)
        model = digits_cnn(2)
        s = spec(
            data,
            cache_features=cache,
            output_dir=f"run_{cache}",
            phases=[{"epochs": 3, "frozen": True, "lr": 0.05}],
        )
        run_finetune(s, model, base_dir=str(data), log=quiet)
        results.append(load_file(data / f"run_{cache}" / "last.safetensors"))
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-6)


def test_cache_true_refuses_when_it_would_change_the_result(data: Path) -> None:
    from ckptsurgeon.errors import UsageError

    s = spec(
        data,
        cache_features=True,
        freeze={**FREEZE, "train_bn": True},
        phases=[{"epochs": 1, "frozen": True, "lr": 0.05}],
    )
    with pytest.raises(UsageError, match="BatchNorm"):
        run_finetune(s, digits_cnn(2), base_dir=str(data), log=quiet)


def _rules_file(data: Path, epochs: int = 3) -> Path:
    torch.save({"model": digits_cnn(2).state_dict()}, data / "init.pt")
    text = f"""\
version: 1
source: {{path: init.pt, key: model}}
target: {{model: {REPO / "rules" / "models.py"}:digits_cnn, kwargs: {{num_classes: 2}}}}
output: init.safetensors
rules: []
finetune:
  data: {{train: {{tensors: train.safetensors}}, val: {{tensors: val.safetensors}}}}
  freeze: {{modules: [features], except: ['^fc\\.']}}
  phases:
    - {{epochs: {epochs}, frozen: true, lr: 0.05}}
    - {{epochs: {epochs}, frozen: false, lr: 0.01, backbone_lr_scale: 0.1, schedule: cosine}}
  optimizer: {{name: sgd, momentum: 0.9, weight_decay: 1.0e-4}}
  batch_size: 8
  cache_features: false
  output_dir: run
"""
    (data / "ft.yaml").write_text(text)
    return data / "ft.yaml"


def test_apply_hands_off_and_resume_after_kill_matches_an_uninterrupted_run(
    data: Path, run_cli
) -> None:
    rules = _rules_file(data, epochs=3)
    proc = run_cli("apply", rules, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # progress went to stderr, stdout is clean JSON
    assert report["finetune"]["epochs"] == 6
    reference = load_file(data / "run" / "last.safetensors")

    # the same run, killed -9 after its third epoch, then resumed
    os.rename(data / "run", data / "reference_run")
    child = subprocess.Popen(
        [sys.executable, "-m", "ckptsurgeon", "finetune", str(rules)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = data / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done = len(metrics.read_text().splitlines())
    assert 3 <= done < 6, "the kill came too late to test resume"
    proc = run_cli("finetune", rules, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert f"resuming after epoch {done}" in proc.stdout, proc.stdout
    resumed = load_file(data / "run" / "last.safetensors")
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=1e-5)
    lines = metrics.read_text().splitlines()
    assert [json.loads(m)["epoch"] for m in lines] == [1, 2, 3, 4, 5, 6]


def test_model_called_with_keyword_inputs_and_logits_output(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (32, 8), generator=gen)
    save_file(
        {"ids": ids, "mask": torch.ones_like(ids), "labels": (ids[:, 0] % 2)},
        tmp_path / "text.safetensors",
    )
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=2,
        )
    )
    s = FinetuneSpec.model_validate(
        {
            "data": {
                "train": {
                    "tensors": "text.safetensors",
                    "inputs": {"input_ids": "ids", "attention_mask": "mask"},
                    "target": "labels",
                }
            },
            "freeze": {"modules": ["bert"]},
            "phases": [{"epochs": 1, "frozen": True, "lr": 0.01}],
            "batch_size": 8,
            "output_dir": "run",
            "optimizer": {"name": "adamw"},
        }
    )
    summary = run_finetune(s, model, base_dir=str(tmp_path), log=quiet)
    assert summary["epochs"] == 1 and summary["final"]["val_acc"] is None


def test_two_processes_with_torchrun(data: Path) -> None:
    rules = _rules_file(data, epochs=1)
    torch.save({"model": digits_cnn(2).state_dict()}, data / "init.pt")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            "-m",
            "ckptsurgeon",
            "apply",
            str(rules),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((data / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    assert len((data / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 only
    assert "destroy_process_group" not in proc.stderr  # the runner ends the group it started
    # the closing lines (where best/last/summary/curves went) come from rank 0 alone
    assert proc.stdout.count("fine-tune finished:") == 1, proc.stdout
    assert f"  best:    {summary['files']['best']} (epoch " in proc.stdout


def test_a_run_that_fails_under_torchrun_still_ends_its_group(data: Path) -> None:
    """A run that fails after joining the process group (here: its data file is missing)
    leaves no group behind, so the caller can go on or train again in the same process."""
    script = data / "fail.py"
    script.write_text(f"""\
import sys
import torch.distributed as dist
sys.path.insert(0, {str(REPO / "rules")!r})
from models import digits_cnn
from ckptsurgeon.errors import CkptSurgeonError
from ckptsurgeon.finetune.runner import run_finetune
from ckptsurgeon.rules.finetune import FinetuneSpec
spec = FinetuneSpec.model_validate({{
    "data": {{"train": {{"tensors": "missing.safetensors"}}}},
    "phases": [{{"epochs": 1, "frozen": False, "lr": 0.1}}],
    "output_dir": "run",
}})
try:
    run_finetune(spec, digits_cnn(2), base_dir={str(data)!r}, log=lambda *_: None)
except CkptSurgeonError as exc:
    # one write per rank, so the two lines do not interleave
    print(f"failed: {{type(exc).__name__}} group left: {{dist.is_initialized()}}", flush=True)
""")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("failed: InputError group left: False") == 2, proc.stdout


@pytest.mark.parametrize("size", [7, 8, 1])
def test_evaluation_under_several_ranks_counts_each_sample_once(size: int) -> None:
    """DistributedSampler pads every rank to the same length (repeating samples); the
    validation loader must not, or the accuracy counts some samples twice."""
    from torch.utils.data import TensorDataset

    from ckptsurgeon.finetune.runner import Runtime, loader_for

    dataset = TensorDataset(torch.arange(size))
    s = spec(Path("."))
    seen: list[int] = []
    for rank in range(2):
        rt = Runtime(torch.device("cpu"), None, rank=rank, world=2)
        seen += [int(i) for (batch,) in loader_for(dataset, s, rt, False, 0, 0) for i in batch]
    assert sorted(seen) == list(range(size))
    # Training still pads, as DDP's lock-step needs equal batch counts per rank.
    rt = Runtime(torch.device("cpu"), None, rank=1, world=2)
    assert len(loader_for(dataset, s, rt, True, 0, 0).sampler) == (size + 1) // 2


def test_a_factory_file_is_imported_under_the_same_name_in_every_process(tmp_path: Path) -> None:
    """Workers started with spawn or forkserver import a file.py:callable again by name."""
    (tmp_path / "factory.py").write_text("def make():\n    return 1\n")
    code = (
        "import sys; from ckptsurgeon.targets.models import load_callable; "
        "print(load_callable(sys.argv[1]).__module__)"
    )
    names = {
        subprocess.run(
            [sys.executable, "-c", code, f"{tmp_path / 'factory.py'}:make"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        for _ in range(2)
    }  # fmt: skip
    assert len(names) == 1 and names.pop().startswith("ckptsurgeon_user_")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_run(data: Path) -> None:
    summary = run_finetune(spec(data, device="cuda"), digits_cnn(2), base_dir=str(data), log=quiet)
    assert summary["device"].startswith("cuda") and summary["precision"] in ("bf16", "fp16")


def test_finetune_reads_weights_with_key_and_allow_global(data: Path, run_cli) -> None:
    """Every command that reads a checkpoint takes --key and --allow-global (SPEC)."""
    import argparse

    rules = _rules_file(data, epochs=1)
    trained = {
        k: v + 0.5 if v.is_floating_point() else v for k, v in digits_cnn(2).state_dict().items()
    }
    other = digits_cnn(2).state_dict()
    torch.save({"ema": trained, "model": other, "args": argparse.Namespace(lr=1)}, data / "w.ckpt")
    base = ("finetune", rules, "--weights", data / "w.ckpt")
    assert_clean_failure(run_cli(*base), 3, "--allow-global argparse.Namespace")
    proc = run_cli(*base, "--allow-global", "argparse.Namespace", "--key", "ema")
    assert proc.returncode == 0, proc.stderr
    assert f"from {data / 'w.ckpt'}" in proc.stdout
    flag = ("--allow-global", "argparse.Namespace")
    assert_clean_failure(run_cli(*base, *flag, "--key", "nope"), 2, "--key 'nope'")


def _trained_state() -> tuple[
    torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler
]:
    """A digits_cnn after two SGD steps, with its named optimizer groups and LR schedule."""
    from ckptsurgeon.finetune.runner import make_optimizer, make_schedule

    torch.manual_seed(0)
    model = digits_cnn(2)
    backbone = backbone_names(model, FreezeSpec(modules=["features"]))
    phase = PhaseSpec(epochs=2, frozen=False, lr=0.1, backbone_lr_scale=0.1, schedule="cosine")
    optimizer = make_optimizer(
        spec(Path(".")), param_groups(model, backbone, phase, 1e-4, decay_all=False)
    )
    schedule = make_schedule(optimizer, phase, steps_per_epoch=3)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(
            model(torch.randn(8, 1, 8, 8)), torch.randint(0, 2, (8,))
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model, optimizer, schedule


def test_training_state_save_load_round_trip(tmp_path: Path) -> None:
    import random

    from ckptsurgeon.finetune.runner import STATE_FILE
    from ckptsurgeon.finetune.state import History, TrainingState

    cpu = torch.device("cpu")
    model, optimizer, schedule = _trained_state()
    metrics = [{"epoch": 1, "train_loss": 0.5, "val_loss": None, "val_acc": None}]
    history = History(phase=1, epoch_in_phase=1, global_epoch=3, best_score=-0.5, metrics=metrics)
    path = str(tmp_path / STATE_FILE)
    TrainingState.capture(model, optimizer, schedule, None, history, cpu).save(path)
    expected_torch, expected_python = torch.rand(4), random.random()  # what comes next
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temporary left behind

    torch.manual_seed(123)  # move both generators on and start from a different model
    random.seed(123)
    other, other_opt, other_schedule = _trained_state()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    loaded = TrainingState.load(path)
    assert loaded.history == history and loaded.scaler is None
    assert loaded.param_groups == [g["name"] for g in optimizer.param_groups]
    other.load_state_dict(loaded.model)
    loaded.restore(other_opt, other_schedule, None, cpu)

    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(optimizer.param_groups, other_opt.param_groups, strict=True):
        assert {k: v for k, v in a.items() if k != "params"} == {
            k: v for k, v in b.items() if k != "params"
        }
        for p, q in zip(a["params"], b["params"], strict=True):
            assert torch.equal(
                optimizer.state[p]["momentum_buffer"], other_opt.state[q]["momentum_buffer"]
            )
    assert other_schedule.state_dict() == schedule.state_dict()
    assert torch.equal(torch.rand(4), expected_torch) and random.random() == expected_python


def test_training_state_restore_refuses_other_param_groups(tmp_path: Path) -> None:
    from ckptsurgeon.errors import UsageError
    from ckptsurgeon.finetune.state import History, TrainingState

    cpu = torch.device("cpu")
    model, optimizer, schedule = _trained_state()
    path = str(tmp_path / "state.pt")
    TrainingState.capture(model, optimizer, schedule, None, History(), cpu).save(path)
    frozen = torch.optim.SGD([{"name": "head.decay", "params": list(model.fc.parameters())}])
    with pytest.raises(UsageError, match="parameter groups do not match"):
        TrainingState.load(path).restore(frozen, schedule, None, cpu)


class _Payload:
    """Unpickling this makes a folder: proof that the pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_training_state_load_refuses_a_pickled_object(tmp_path: Path) -> None:
    from ckptsurgeon.errors import UsageError
    from ckptsurgeon.finetune.state import TrainingState

    marker = tmp_path / "ran"
    path = tmp_path / "state.pt"
    torch.save({"model": {}, "history": _Payload(marker)}, path)
    with pytest.raises(UsageError, match=r"--resume: cannot read .*state\.pt"):
        TrainingState.load(str(path))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: only weights_only stopped it
    assert marker.is_dir()


def test_a_phase_unfreezes_part_of_the_backbone(data: Path) -> None:
    """The guide's first recipe: train the head, then unfreeze the top of the backbone and
    train it with the head; the rest (and its BatchNorm statistics) stays as it was."""
    torch.manual_seed(0)
    model = digits_cnn(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = spec(
        data,
        phases=[
            {"epochs": 1, "frozen": True, "lr": 0.05},
            {"epochs": 1, "frozen": True, "unfreeze": ["features.3", r"features\.4\."],
             "lr": 0.01, "backbone_lr_scale": 0.1},
        ],
    )  # fmt: skip
    run_finetune(s, model, base_dir=str(data), log=quiet)
    after = model.state_dict()
    for key in ("features.0.weight", "features.1.weight", "features.1.running_mean"):
        assert torch.equal(after[key], before[key]), key  # still frozen, BN in eval
    for key in ("features.3.weight", "features.4.weight", "features.4.running_mean", "fc.weight"):
        assert not torch.equal(after[key], before[key]), key  # trained in phase 2
    lines = [json.loads(x) for x in (data / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["trainable_params"] > lines[0]["trainable_params"]


@pytest.mark.parametrize(
    ("unfreeze", "frozen", "needle"),
    [
        (["nope"], True, "names no module and matches no parameter"),
        (["fc"], True, "outside the frozen backbone"),
        (["features.3"], False, "unfreeze goes with frozen: true"),
        (["("], True, "invalid regular expression"),
    ],
)
def test_bad_unfreeze_is_one_clear_error(data: Path, unfreeze, frozen, needle) -> None:
    from ckptsurgeon.errors import UsageError

    phases = [{"epochs": 1, "frozen": frozen, "unfreeze": unfreeze, "lr": 0.01}]
    with pytest.raises((UsageError, ValueError), match=re.escape(needle)):
        run_finetune(spec(data, phases=phases), digits_cnn(2), base_dir=str(data), log=quiet)


def test_layer_decay_blocks_follow_the_model_stack_or_its_children() -> None:
    """timm's layer-wise LR decay: one factor per block between a parameter and the head."""
    import torchvision
    import transformers

    from ckptsurgeon.finetune.freeze import block_of

    bert = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
            intermediate_size=32, num_labels=2, max_position_embeddings=16,
        )
    )  # fmt: skip
    blocks = block_of(bert)
    assert blocks["bert.embeddings.word_embeddings.weight"] == 0
    assert blocks["bert.encoder.layer.0.attention.self.query.weight"] == 1
    assert blocks["bert.encoder.layer.3.output.dense.weight"] == 4
    assert blocks["bert.pooler.dense.weight"] == blocks["classifier.weight"] == 5

    resnet = torchvision.models.resnet18(num_classes=3)
    backbone = {n for n, _ in resnet.named_parameters() if not n.startswith("fc.")}
    phase = PhaseSpec(epochs=1, frozen=False, lr=1.0, backbone_lr_scale=0.1, layer_decay=0.5)
    lrs = {g["name"]: g["lr"] for g in param_groups(resnet, backbone, phase, 0.0, False)}
    # children with weights: conv1, bn1, layer1..layer4, fc -> layer4 is 1 block below fc
    assert lrs["head.decay"] == 1.0
    assert lrs["backbone.decay.depth01"] == pytest.approx(0.1 * 0.5)  # layer4
    assert lrs["backbone.decay.depth06"] == pytest.approx(0.1 * 0.5**6)  # conv1
    groups = param_groups(resnet, backbone, phase, 0.0, False)
    layer4 = {id(p) for p in resnet.layer4.parameters() if p.ndim > 1}
    assert {
        id(p) for g in groups if g["name"] == "backbone.decay.depth01" for p in g["params"]
    } == layer4


def test_layer_decay_lrs_are_in_each_phases_first_metrics_line(data: Path) -> None:
    s = spec(
        data,
        phases=[
            {"epochs": 1, "frozen": True, "lr": 0.05},
            {"epochs": 2, "frozen": False, "lr": 0.01, "backbone_lr_scale": 0.5,
             "layer_decay": 0.5},
        ],
    )  # fmt: skip
    run_finetune(s, digits_cnn(2), base_dir=str(data), log=quiet)
    lines = [json.loads(x) for x in (data / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "group_lrs" in lines[0] and "group_lrs" in lines[1] and "group_lrs" not in lines[2]
    assert lines[1]["group_lrs"]["head.decay"] == pytest.approx(0.01)
    # digits_cnn's stack is its 8-entry features Sequential; fc comes after it (block 9), so
    # features.3 (block 4) is 5 blocks below the head
    assert lines[1]["group_lrs"]["backbone.decay.depth05"] == pytest.approx(0.01 * 0.5 * 0.5**5)


@pytest.mark.parametrize("value", [0, 1.5, -0.1])
def test_layer_decay_outside_zero_one_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match="layer_decay"):
        PhaseSpec(epochs=1, frozen=False, lr=0.1, layer_decay=value)
