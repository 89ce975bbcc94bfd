"""The strict target check agrees with ``model.load_state_dict(sd, strict=True)``.

Each case writes a real checkpoint, asks torch whether a freshly built model loads it
strictly, and asks ``check`` the same question: BatchNorm files without
``num_batches_tracked``, a 0-dim parameter stored as shape [1], torchvision's MNASNet (a
load hook that needs version metadata) and RegNet (cannot be built on the meta device),
modules with ``get_extra_state``, and a load hook that always raises. No network, no
pretrained weights.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

import ckptsurgeon
from ckptsurgeon.formats import open_checkpoint
from ckptsurgeon.rules.config import TargetSpec
from ckptsurgeon.targets.check import CheckResult, check_table
from ckptsurgeon.targets.models import load_callable
from ckptsurgeon.targets.spec import resolve_target, target_from_cli

RESNET18_10 = ("torchvision.models:resnet18", {"num_classes": 10})

# Targets given as "file.py:callable", as a user with a model of their own would.
MODELS = '''
import torch
from torch import nn


class Scalar(nn.Module):
    """CLIP-like: a 0-dim parameter next to an ordinary layer."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.fc = nn.Linear(2, 2)


class WithExtra(nn.Module):
    """Keeps non-tensor state through get_extra_state, as TransformerEngine layers do."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = 1.0

    def get_extra_state(self):
        return {"scale": self.scale}

    def set_extra_state(self, state):
        self.scale = state["scale"]


class TensorExtra(nn.Module):
    """Extra state that is a tensor whose length varies (say, a calibration history)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.history = torch.zeros(3)

    def get_extra_state(self):
        return self.history

    def set_extra_state(self, state):
        self.history = state


class Refuses(nn.Module):
    """A load hook that refuses every state dict."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        raise ValueError("this layout is no longer supported")


def scalar():
    return Scalar()


def with_extra():
    return nn.Sequential(WithExtra(), nn.ReLU())


def tensor_extra():
    return nn.Sequential(TensorExtra())


def refuses():
    return nn.Sequential(nn.Linear(2, 2), Refuses())
'''


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "models.py"
    path.write_text(MODELS)
    return path


def loads_strictly(factory: Callable[[], nn.Module], state: dict[str, torch.Tensor]) -> bool:
    """torch's own verdict, on a freshly built model."""
    try:
        factory().load_state_dict(state, strict=True)
    except RuntimeError:
        return False
    return True


def read_back(path: Path) -> dict[str, torch.Tensor]:
    """The state dict a user gets from the file (plain dicts keep no ``_metadata``)."""
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, weights_only=True)


def check(path: Path, target: str, kwargs: dict | None = None) -> CheckResult:
    return ckptsurgeon.check(path, target, kwargs=kwargs)


def resnet18_10() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def without(state: dict[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in state.items() if not k.endswith(suffix)}


# --- BatchNorm's num_batches_tracked ---------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_batchnorm_without_num_batches_tracked_loads(
    tmp_path: Path, resnet18_state: dict[str, torch.Tensor], suffix: str
) -> None:
    state = without(resnet18_state, "num_batches_tracked")
    path = tmp_path / f"r18{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(dict(state), path)
    assert loads_strictly(resnet18_10, read_back(path))

    result = check(path, *RESNET18_10)
    assert result.ok, result.lines()
    assert result.missing == []
    assert len(result.filled) == 20
    assert all(n.endswith(".num_batches_tracked") for n in result.filled)


def test_batchnorm_missing_running_mean_still_fails(
    tmp_path: Path, resnet18_state: dict[str, torch.Tensor]
) -> None:
    state = without(without(resnet18_state, "num_batches_tracked"), "bn1.running_mean")
    path = tmp_path / "r18.safetensors"
    save_file(state, path)
    assert not loads_strictly(resnet18_10, read_back(path))

    result = check(path, *RESNET18_10)
    assert not result.ok
    assert all(n.endswith("bn1.running_mean") for n in result.missing), result.missing
    assert "layer1.0.bn1.num_batches_tracked" in result.filled

    # A BatchNorm absent as a whole is listed whole (torch fails on its other keys anyway).
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("bn1.")}, path)
    assert not loads_strictly(resnet18_10, read_back(path))
    result = check(path, *RESNET18_10)
    assert not result.ok
    assert "bn1.num_batches_tracked" in result.missing
    assert "bn1.num_batches_tracked" not in result.filled


def test_cli_batchnorm_without_num_batches_tracked_exits_0(
    tmp_path: Path, resnet18_state: dict[str, torch.Tensor], run_cli
) -> None:
    path = tmp_path / "r18.safetensors"
    save_file(without(resnet18_state, "num_batches_tracked"), path)
    proc = run_cli("check", path, "--target", RESNET18_10[0], "--kwargs", '{"num_classes": 10}')
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "loads strictly into" in proc.stdout
    assert "filled in by load_state_dict itself (20)" in proc.stdout


# --- a 0-dim parameter ----------------------------------------------------------------


def test_zero_dim_parameter_takes_what_torch_takes(tmp_path: Path, models: Path) -> None:
    """Shape [1] loads into a 0-dim parameter (CLIP's logit_scale); other shapes do not."""
    factory = load_callable(f"{models}:scalar")
    for shape, torch_accepts in [((1,), True), ((), True), ((2,), False), ((1, 1), False)]:
        state = {k: v.detach().clone() for k, v in factory().state_dict().items()}
        state["logit_scale"] = torch.full(shape, 4.6)
        path = tmp_path / f"clip{len(shape)}{sum(shape)}.safetensors"
        save_file(state, path)
        assert loads_strictly(factory, read_back(path)) is torch_accepts  # the installed torch

        result = check(path, f"{models}:scalar")
        assert result.ok is torch_accepts, (shape, result.lines())
        scalar_note = any("shape [1] into a 0-dim" in n for n in result.notes)
        assert scalar_note is (shape == (1,)), (shape, result.notes)


# --- torchvision targets with their own loading code ----------------------------------


def test_mnasnet_state_dict_saved_by_torch_loads(tmp_path: Path) -> None:
    path = tmp_path / "mnasnet.pth"
    torch.save(torchvision.models.mnasnet0_5().state_dict(), path)  # records _metadata
    assert loads_strictly(torchvision.models.mnasnet0_5, read_back(path))

    result = check(path, "torchvision.models:mnasnet0_5")
    assert result.ok, result.lines()
    assert result.load_error is None
    note = next(n for n in result.notes if "version metadata" in n)
    assert "MNASNet (the root module) raised ValueError" in note

    # Under the version metadata the retry uses, what torch misses is still reported: an
    # ordinary key, and num_batches_tracked (BatchNorm fills it only for older versions).
    full = torchvision.models.mnasnet0_5().state_dict()
    for dropped in ["classifier.1.bias", "layers.1.num_batches_tracked"]:
        state = collections.OrderedDict((k, v) for k, v in full.items() if k != dropped)
        state._metadata = full._metadata  # type: ignore[attr-defined]  # as torch.save keeps it
        torch.save(state, path)
        assert not loads_strictly(torchvision.models.mnasnet0_5, read_back(path))
        result = check(path, "torchvision.models:mnasnet0_5")
        assert result.missing == [dropped], result.lines()
        assert result.filled == []


def test_mnasnet_note_says_how_a_plain_dict_loads(tmp_path: Path) -> None:
    """Without metadata MNASNet refuses a plain dict; the note's remedy makes it load."""
    state = {k: v.contiguous() for k, v in torchvision.models.mnasnet0_5().state_dict().items()}
    path = tmp_path / "mnasnet.safetensors"
    save_file(state, path)
    result = check(path, "torchvision.models:mnasnet0_5")
    assert result.ok, result.lines()
    assert "sd._metadata = model.state_dict()._metadata" in " ".join(result.notes)

    model = torchvision.models.mnasnet0_5()
    with pytest.raises(ValueError, match="version"):
        model.load_state_dict(read_back(path), strict=True)
    sd = collections.OrderedDict(read_back(path))
    sd._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
    model.load_state_dict(sd, strict=True)


def test_load_hook_that_raises_is_a_clean_failure(tmp_path: Path, models: Path) -> None:
    factory = load_callable(f"{models}:refuses")
    state = factory().state_dict()
    path = tmp_path / "refused.safetensors"
    save_file(state, path)
    with pytest.raises(ValueError, match="no longer supported"):
        factory().load_state_dict(read_back(path), strict=True)

    result = check(path, f"{models}:refuses")
    assert not result.ok
    assert result.load_error == (
        "Refuses (module '1') raised ValueError: this layout is no longer supported"
    )


def test_regnet_is_built_on_the_cpu_when_meta_fails(tmp_path: Path) -> None:
    state = torchvision.models.regnet_x_400mf().state_dict()
    path = tmp_path / "regnet.pth"
    torch.save(state, path)
    assert loads_strictly(torchvision.models.regnet_x_400mf, read_back(path))

    target = target_from_cli("torchvision.models:regnet_x_400mf", None)
    assert target.model is not None
    assert all(p.is_meta for p in target.model.parameters())  # the CPU copy is gone
    result = check_table(open_checkpoint(path).tensors, target)
    assert result.ok, result.lines()
    assert any("built on the CPU" in n for n in result.notes), result.notes

    del state["fc.bias"]
    torch.save(state, path)
    assert not loads_strictly(torchvision.models.regnet_x_400mf, read_back(path))
    result = check_table(open_checkpoint(path).tensors, target)
    assert result.missing == ["fc.bias"]

    # Failing on the CPU too is still bad usage, with the reason.
    with pytest.raises(ckptsurgeon.UsageError, match="on the CPU: TypeError"):
        target_from_cli("torchvision.models:regnet_x_400mf", {"no_such_argument": 1})


# --- extra state ------------------------------------------------------------------------


def test_non_tensor_extra_state_is_missing_from_a_tensor_file(
    tmp_path: Path, models: Path, run_cli
) -> None:
    factory = load_callable(f"{models}:with_extra")
    tensors = {k: v for k, v in factory().state_dict().items() if isinstance(v, torch.Tensor)}
    path = tmp_path / "extra.safetensors"
    save_file(tensors, path)
    assert not loads_strictly(factory, read_back(path))  # torch: missing 0._extra_state

    target = target_from_cli(f"{models}:with_extra", None)
    result = check_table(open_checkpoint(path).tensors, target)
    assert result.missing == ["0._extra_state"]
    assert any("get_extra_state" in n for n in result.notes)

    relaxed = check_table(open_checkpoint(path).tensors, target, allow_missing=["_extra_state$"])
    assert relaxed.ok, relaxed.lines()
    assert relaxed.allowed_missing == ["0._extra_state"]

    proc = run_cli("check", path, "--target", f"{models}:with_extra")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "missing from the checkpoint (1): 0._extra_state" in proc.stdout
    assert "internal error" not in proc.stderr


def test_tensor_extra_state_has_no_shape_to_match(tmp_path: Path, models: Path) -> None:
    factory = load_callable(f"{models}:tensor_extra")
    state = dict(factory().state_dict())
    state["0._extra_state"] = torch.arange(5.0)  # the model starts with 3: set_extra_state
    path = tmp_path / "extra.safetensors"
    save_file(state, path)
    assert loads_strictly(factory, read_back(path))

    result = check(path, f"{models}:tensor_extra")
    assert result.ok, result.lines()
    assert result.shape == []


# --- "~" in target paths ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["checkpoint", "manifest", "model"])
def test_target_paths_expand_home(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    resnet18_state: dict[str, torch.Tensor],
    kind: str,
) -> None:
    home, rules_dir = tmp_path / "home", tmp_path / "rules"
    home.mkdir()
    rules_dir.mkdir()
    monkeypatch.setenv("HOME", str(home))
    save_file({k: v.contiguous() for k, v in resnet18_state.items()}, home / "r18.safetensors")
    manifest = '{"tensors": {"fc.weight": {"shape": [10, 512], "dtype": "float32"}}}'
    (home / "r18.json").write_text(manifest)
    (home / "net.py").write_text("import torch\ndef net():\n    return torch.nn.Linear(2, 2)\n")
    spec = {
        "checkpoint": TargetSpec(checkpoint="~/r18.safetensors"),
        "manifest": TargetSpec(manifest="~/r18.json"),
        "model": TargetSpec(model="~/net.py:net"),
    }[kind]

    target = resolve_target(spec, base_dir=str(rules_dir))
    assert target.expected, target.description


def test_target_from_command_line_expands_home(
    monkeypatch: pytest.MonkeyPatch, models: Path
) -> None:
    """``--target '~/models.py:scalar'`` (quoted, so the shell leaves ``~`` alone)."""
    monkeypatch.setenv("HOME", str(models.parent))
    target = target_from_cli("~/models.py:scalar", None)
    assert set(target.expected) == {"logit_scale", "fc.weight", "fc.bias"}
    with pytest.raises(ckptsurgeon.UsageError, match="no file"):
        target_from_cli("~/absent.py:scalar", None)
