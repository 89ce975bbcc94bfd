"""The values each ``init`` scheme promises, checked by their statistics, and the bytes a seed
fixes.

``fill_missing`` / ``reinit_mismatched`` with ``init:`` (a checkpoint or manifest target, or a
model target given an explicit ``init``) draw from ``ckptsurgeon.targets.initialize
.from_scheme``: ``normal`` is N(0, 0.02); ``xavier_uniform`` is U(-b, b) with
b = sqrt(6 / (fan_in + fan_out)); ``kaiming_uniform`` is torch's Linear/Conv default,
``kaiming_uniform_(a=sqrt(5))``, so b = 1 / sqrt(fan_in); fans as ``torch.nn.init`` counts
them (a conv's receptive field in both). ``resize`` pads with N(0, ``std``) (0.02 unless
given). Each tensor is seeded from the run's seed and its own name.

The tensors hold 131072 values, so the sample standard deviation is within about 0.3 % of
the true one (1 % is several standard errors) and the sample mean within a few 1e-5.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import materialise
from safetensors.torch import load_file, save_file
from torch import nn

from ckptsurgeon.api import apply as apply_file
from ckptsurgeon.engine.plan import run_rules
from ckptsurgeon.formats.table import from_tensor
from ckptsurgeon.rules.document import parse_rules
from ckptsurgeon.targets.spec import TargetInfo, expected_from_model

SHAPE = (256, 512)  # a Linear(512, 256) weight: fan_in 512, fan_out 256
CONV = (256, 64, 3, 3)  # a Conv2d(64, 256, 3) weight: fan_in 576, fan_out 2304
NORMAL_STD = 0.02  # what init: normal documents in from_scheme


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """torch.nn.init's own fan_in and fan_out: the reference the schemes promise."""
    return nn.init._calculate_fan_in_and_fan_out(torch.empty(shape, device="meta"))


def xavier_bound(shape: tuple[int, ...]) -> float:
    fan_in, fan_out = fans(shape)
    return math.sqrt(3.0) * nn.init.calculate_gain("linear") * math.sqrt(2.0 / (fan_in + fan_out))


def kaiming_bound(shape: tuple[int, ...]) -> float:
    """kaiming_uniform_(a=sqrt(5)), what nn.Linear and nn.Conv2d run: 1 / sqrt(fan_in)."""
    fan_in, _ = fans(shape)
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    return math.sqrt(3.0) * gain / math.sqrt(fan_in)


def assert_normal(t: torch.Tensor, std: float) -> None:
    """Mean 0 and standard deviation ``std``, and bell-shaped: 68.3 % within one std."""
    x = t.double().flatten()
    n = x.numel()
    assert n >= 100_000
    assert abs(x.mean().item()) < 5 * std / math.sqrt(n), x.mean().item()
    assert x.std().item() == pytest.approx(std, rel=0.01)
    inside = (x.abs() < std).double().mean().item()
    assert inside == pytest.approx(math.erf(1 / math.sqrt(2)), abs=0.01)  # not uniform


def assert_uniform(t: torch.Tensor, bound: float) -> None:
    """Within +-``bound``, reaching it, and flat over it: std bound/sqrt(3), each eighth of
    the interval holding an eighth of the values."""
    x = t.double().flatten()
    n = x.numel()
    assert n >= 100_000
    top = x.abs().max().item()
    assert top <= bound * (1 + 1e-6), (top, bound)  # float32 rounding of the bound only
    assert top > bound * 0.999, (top, bound)
    assert abs(x.mean().item()) < 5 * bound / math.sqrt(3 * n), x.mean().item()
    assert x.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    eighths = torch.histc(x, bins=8, min=-bound, max=bound) / n
    assert torch.allclose(eighths, torch.full((8,), 1 / 8, dtype=eighths.dtype), atol=0.005)


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def fill(
    init: str, expected: dict[str, tuple[tuple[int, ...], torch.dtype]], seed: int = 0, **rule
) -> dict[str, torch.Tensor]:
    """``fill_missing`` with ``init`` against a manifest target of ``expected``."""
    target = TargetInfo("manifest m", expected)
    spec = parse_rules({"rules": [{"op": "fill_missing", "init": init, **rule}], "seed": seed})
    return materialise(run_rules(spec, {}, target)[0])


def one(init: str, shape: tuple[int, ...], seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    out = fill(init, {"w": (shape, dtype)}, seed)["w"]
    assert out.shape == shape and out.dtype == dtype
    return out


# ---------------------------------------------------------------- the schemes' statistics


def test_normal_is_mean_zero_std_0_02() -> None:
    assert_normal(one("normal", SHAPE), NORMAL_STD)


@pytest.mark.parametrize("shape", [SHAPE, CONV], ids=["linear", "conv"])
def test_xavier_uniform_spans_its_bound(shape: tuple[int, ...]) -> None:
    bound = xavier_bound(shape)
    fan_in, fan_out = fans(shape)
    assert bound == pytest.approx(math.sqrt(6 / (fan_in + fan_out)))
    assert_uniform(one("xavier_uniform", shape), bound)


@pytest.mark.parametrize("shape", [SHAPE, CONV], ids=["linear", "conv"])
def test_kaiming_uniform_is_torchs_linear_default(shape: tuple[int, ...]) -> None:
    bound = kaiming_bound(shape)
    assert bound == pytest.approx(1 / math.sqrt(fans(shape)[0]))
    assert_uniform(one("kaiming_uniform", shape), bound)


def test_a_bfloat16_target_gets_the_same_distribution_in_its_dtype() -> None:
    assert_normal(one("normal", SHAPE, dtype=torch.bfloat16), NORMAL_STD)
    assert_uniform(one("xavier_uniform", SHAPE, dtype=torch.bfloat16), xavier_bound(SHAPE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_zeros_and_ones_are_exact(dtype: torch.dtype) -> None:
    assert torch.equal(one("zeros", SHAPE, dtype=dtype), torch.zeros(SHAPE, dtype=dtype))
    assert torch.equal(one("ones", SHAPE, dtype=dtype), torch.ones(SHAPE, dtype=dtype))


@pytest.mark.parametrize("init", ["xavier_uniform", "kaiming_uniform"])
def test_fan_based_schemes_leave_a_vector_at_zero(init: str) -> None:
    # A 1-D tensor has no fan-in/fan-out (torch.nn.init refuses it); the scheme gives zeros.
    assert torch.equal(one(init, (512,)), torch.zeros(512))


def test_each_tensor_gets_its_own_statistics() -> None:
    """Two shapes in one run: each is drawn against its own fans, not the first one's."""
    wide, narrow = (128, 1024), (1024, 128)
    out = fill(
        "kaiming_uniform", {"wide": (wide, torch.float32), "narrow": (narrow, torch.float32)}
    )
    assert_uniform(out["wide"], kaiming_bound(wide))  # 1/32
    assert_uniform(out["narrow"], kaiming_bound(narrow))  # 1/sqrt(128)


def test_reinit_mismatched_draws_from_the_scheme() -> None:
    target = TargetInfo("checkpoint c", {"w": (SHAPE, torch.float32)})
    table = {"w": from_tensor(torch.full((4, 4), 7.0), "w")}
    spec = parse_rules({"rules": [{"op": "reinit_mismatched", "init": "xavier_uniform"}]})
    out = materialise(run_rules(spec, table, target)[0])
    assert_uniform(out["w"], xavier_bound(SHAPE))


def test_a_model_target_with_an_explicit_init_draws_from_the_scheme() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(512, 256), nn.Conv2d(64, 256, 3))
    target = TargetInfo("model", expected_from_model(model), model)
    spec = parse_rules({"rules": [{"op": "fill_missing", "init": "normal"}]})
    out = materialise(run_rules(spec, {}, target)[0])
    assert_normal(out["0.weight"], NORMAL_STD)
    assert_normal(out["1.weight"], NORMAL_STD)
    target = TargetInfo("model", expected_from_model(model), model)
    spec = parse_rules({"rules": [{"op": "fill_missing", "init": "xavier_uniform"}]})
    out = materialise(run_rules(spec, {}, target)[0])
    assert_uniform(out["0.weight"], xavier_bound(SHAPE))
    assert_uniform(out["1.weight"], xavier_bound(CONV))


# ------------------------------------------------------------------------- seeded bytes


@pytest.mark.parametrize("init", ["normal", "xavier_uniform", "kaiming_uniform"])
def test_a_seed_fixes_the_bytes_per_tensor_name(init: str) -> None:
    expected = {"a": (SHAPE, torch.float32), "b": (SHAPE, torch.float32)}
    first, again, other = fill(init, expected, 7), fill(init, expected, 7), fill(init, expected, 8)
    for name in expected:
        assert as_bytes(first[name]) == as_bytes(again[name]), name
        assert not torch.equal(first[name], other[name]), name  # the seed is used
    assert not torch.equal(first["a"], first["b"])  # each name draws its own values
    alone = fill(init, expected, 7, pattern="^b$")
    assert list(alone) == ["b"] and as_bytes(alone["b"]) == as_bytes(first["b"])


# ---------------------------------------------------------------------------- resize


def resized(seed: int = 0, std: float | None = None, name: str = "w") -> torch.Tensor:
    """A (4, 512) tensor padded to (260, 512) with init: normal; the (256, 512) new rows."""
    w = torch.full((4, 512), 3.0)
    rule = {"op": "resize", "pattern": name, "dim": 0, "size": 260, "init": "normal"}
    if std is not None:
        rule["std"] = std
    spec = parse_rules({"rules": [rule], "seed": seed})
    got = run_rules(spec, {name: from_tensor(w, name)}, None)[0][name].load()
    assert got.shape == (260, 512) and torch.equal(got[:4], w)
    return got[4:]


@pytest.mark.parametrize("std", [None, 0.5], ids=["default", "given"])
def test_resize_normal_is_mean_zero_with_its_std(std: float | None) -> None:
    assert_normal(resized(std=std), NORMAL_STD if std is None else std)


def test_resize_normal_pads_along_dim_1_too() -> None:
    w = torch.full((256, 4), 3.0)
    rule = {"op": "resize", "pattern": "w", "dim": 1, "size": 516, "init": "normal", "std": 0.1}
    got = run_rules(parse_rules({"rules": [rule]}), {"w": from_tensor(w, "w")}, None)[0]["w"]
    got = got.load()
    assert got.shape == (256, 516) and torch.equal(got[:, :4], w)
    assert_normal(got[:, 4:], 0.1)


def test_resize_normal_is_seeded_per_tensor_name() -> None:
    first = resized(seed=3)
    assert as_bytes(first) == as_bytes(resized(seed=3))
    assert not torch.equal(first, resized(seed=4))
    assert not torch.equal(first, resized(seed=3, name="v"))


# ------------------------------------------------------------- end to end, as users run it


def test_rules_files_with_checkpoint_and_manifest_targets(tmp_path: Path) -> None:
    """apply() on a rules file: the written values follow each op's scheme, and a second run
    writes the same bytes."""
    save_file({"proj": torch.ones(8, 8)}, tmp_path / "source.safetensors")
    reference = {"proj": torch.empty(SHAPE), "head": torch.empty(CONV), "scale": torch.empty(512)}
    save_file(reference, tmp_path / "reference.safetensors")
    manifest = {n: {"shape": list(t.shape), "dtype": "float32"} for n, t in reference.items()}
    (tmp_path / "manifest.json").write_text(json.dumps({"tensors": manifest}))
    rules = [
        {"op": "reinit_mismatched", "init": "kaiming_uniform"},
        {"op": "fill_missing", "pattern": "^head$", "init": "xavier_uniform"},
        {"op": "fill_missing", "pattern": "^scale$", "init": "ones"},
    ]
    for target in ({"checkpoint": "reference.safetensors"}, {"manifest": "manifest.json"}):
        outputs = []
        for run in ("first", "second"):
            doc = {
                "version": 1,
                "source": "source.safetensors",
                "target": target,
                "output": f"{run}.safetensors",
                "seed": 11,
                "rules": rules,
            }
            (tmp_path / "rules.yaml").write_text(yaml.safe_dump(doc))
            apply_file(tmp_path / "rules.yaml")
            outputs.append(load_file(tmp_path / f"{run}.safetensors"))
        out, again = outputs
        assert_uniform(out["proj"], kaiming_bound(SHAPE))
        assert_uniform(out["head"], xavier_bound(CONV))
        assert torch.equal(out["scale"], torch.ones(512))
        assert {n: as_bytes(t) for n, t in out.items()} == {
            n: as_bytes(t) for n, t in again.items()
        }
