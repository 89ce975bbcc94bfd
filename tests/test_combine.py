"""Several checkpoints into one: named ``sources:``, ``take``, ``average``, Stable
Diffusion's dotless EMA copy, and blockwise fp8 ``dequantize``; the example rules files
run through the CLI, the results checked against references computed here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_clean_failure, materialise
from safetensors.torch import load_file, save_file

from ckptsurgeon.engine.plan import Plan
from ckptsurgeon.errors import FitError, InputError, RulesError, UsageError
from ckptsurgeon.formats import open_checkpoint
from ckptsurgeon.formats.sd_ema import undotted
from ckptsurgeon.formats.table import from_tensor
from ckptsurgeon.job import Job
from ckptsurgeon.rules.document import parse_document, parse_rules

sys.path.insert(0, str(REPO / "examples"))
import make_combine as make

EXAMPLES = ("average_checkpoints", "take_from_other", "sd_ema_weights", "dequantize_fp8")


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's layout in a temporary folder: the example rules files in rules/,
    their inputs in examples/checkpoints/ (where the files' relative paths point)."""
    root = tmp_path_factory.mktemp("combine")
    ckpts = root / "examples" / "checkpoints"
    ckpts.mkdir(parents=True)
    (root / "rules").mkdir()
    for maker in make.EXAMPLES.values():
        maker(ckpts)
    for name in EXAMPLES:
        shutil.copy(REPO / "rules" / f"{name}.yaml", root / "rules")
    return root


def apply_example(
    run_cli, project: Path, name: str, *flags: str
) -> subprocess.CompletedProcess[str]:
    proc = run_cli("apply", project / "rules" / f"{name}.yaml", *flags)
    assert proc.returncode == 0, proc.stderr
    return proc


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def job(project: Path, doc: dict) -> Job:
    """A rules document run from the checkpoints folder (its paths relative to it)."""
    return Job.from_mapping(doc, base_dir=str(project / "examples" / "checkpoints"))


# -- average ------------------------------------------------------------------------------


def test_average_example_is_timms_mean(run_cli, project: Path) -> None:
    proc = apply_example(run_cli, project, "average_checkpoints", "--verbose")
    assert "averaged with ep2, ep3 (weights equal)" in proc.stdout
    out = load_file(project / "examples" / "out" / "resnet18_averaged.safetensors")
    snaps = [state(project / "examples" / "checkpoints" / f"resnet18_ep{i}.pth") for i in (1, 2, 3)]
    assert sorted(out) == sorted(snaps[0])
    for name, first in snaps[0].items():
        if first.is_floating_point():
            # timm's avg_checkpoints: sum in float64, divide by the count, back to float32
            acc = first.clone().to(torch.float64)
            for other in snaps[1:]:
                acc += other[name].to(torch.float64)
            expected = acc.div_(3).to(torch.float32)
            assert torch.equal(out[name], expected), name
        else:  # num_batches_tracked: the first's (timm would average it into a float)
            assert out[name].dtype == first.dtype and torch.equal(out[name], first), name
    tracked = [s["bn1.num_batches_tracked"].item() for s in snaps]
    assert tracked == [1, 2, 3]  # the inputs do differ where the first's value is kept
    moved = out["conv1.weight"] - snaps[0]["conv1.weight"]
    assert moved.abs().max() > 0  # it is a mean, not a copy of the first


def test_average_with_weights_against_a_float64_reference(project: Path) -> None:
    doc = {
        "source": "resnet18_ep1.pth",
        "sources": {"b": "resnet18_ep2.pth", "c": "resnet18_ep3.pth"},
        "rules": [
            {"op": "average", "from": ["b", "c"], "weights": [0.5, 0.2, 0.3], "pattern": "^layer1"}
        ],
    }
    plan = job(project, doc).plan()
    out = materialise(plan.table)
    ckpts = project / "examples" / "checkpoints"
    a, b, c = (state(ckpts / f"resnet18_ep{i}.pth") for i in (1, 2, 3))
    for name in a:
        if not name.startswith("layer1") or not a[name].is_floating_point():
            assert torch.equal(out[name], a[name]), name  # outside the pattern: the table's
            continue
        ref = (0.5 * a[name].double() + 0.2 * b[name].double() + 0.3 * c[name].double()) / 1.0
        # float64 sums in another order may round apart by an ulp: allow one float32 ulp
        torch.testing.assert_close(out[name], ref.float(), rtol=1.2e-7, atol=1e-30)
        assert not torch.equal(out[name], a[name])


def test_average_accumulates_in_float64_and_keeps_the_dtype(tmp_path: Path) -> None:
    """bf16 inputs: the mean is rounded once, from float64, not after every bf16 add."""
    gen = torch.Generator().manual_seed(0)
    xs = [(1 + torch.rand(4096, generator=gen) * 1e-2).to(torch.bfloat16) for _ in range(4)]
    for i, x in enumerate(xs):
        save_file({"w": x}, tmp_path / f"{i}.safetensors")
    doc = {
        "source": "0.safetensors",
        "sources": {f"s{i}": f"{i}.safetensors" for i in (1, 2, 3)},
        "rules": [{"op": "average", "from": ["s1", "s2", "s3"]}],
    }
    got = materialise(Job.from_mapping(doc, base_dir=str(tmp_path)).plan().table)["w"]
    exact = (sum(x.double() for x in xs) / 4).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, exact)
    naive = (((xs[0] + xs[1]) + xs[2]) + xs[3]) / 4  # in bfloat16
    assert not torch.equal(naive, exact)  # the float64 accumulation is what made it exact


def test_average_by_chunks_from_files_is_the_whole_tensor_mean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Safetensors inputs are averaged a piece at a time (flat memory); a torch pickle's
    whole tensors are not. Both give the same bytes, with weights and a ragged last piece."""
    from ckptsurgeon.rules.ops import kernels  # where the average reads its piece size

    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(37, 29, generator=gen) for _ in range(3)]
    for i, x in enumerate(xs):
        save_file({"w": x}, tmp_path / f"{i}.safetensors")
        torch.save({"w": x}, tmp_path / f"{i}.pt")
    monkeypatch.setattr(kernels, "AVERAGE_CHUNK", 100)  # 37 * 29 = 1073: 11 pieces, last ragged
    results = []
    for suffix in ("safetensors", "pt"):
        doc = {
            "source": f"0.{suffix}",
            "sources": {"a": f"1.{suffix}", "b": f"2.{suffix}"},
            "rules": [{"op": "average", "from": ["a", "b"], "weights": [3, 1, 0.5]}],
        }
        results.append(materialise(Job.from_mapping(doc, base_dir=str(tmp_path)).plan().table))
    chunked, whole = results
    assert torch.equal(chunked["w"], whole["w"])
    reference = (3 * xs[0].double() + xs[1].double() + 0.5 * xs[2].double()) / 4.5
    torch.testing.assert_close(chunked["w"], reference.float(), rtol=1.2e-7, atol=1e-30)


def test_average_a_missing_key_or_shape_names_both(tmp_path: Path) -> None:
    save_file({"w": torch.ones(3), "v": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(3)}, tmp_path / "b.safetensors")
    save_file({"w": torch.ones(4), "v": torch.ones(2)}, tmp_path / "c.safetensors")
    for other, needle in (("b", "'v' is in the table but not in source 'b'"),
                          ("c", "'w' is [3] in the table but [4] in source 'c'")):  # fmt: skip
        doc = {
            "source": "a.safetensors",
            "sources": {other: f"{other}.safetensors"},
            "rules": [{"op": "average", "from": [other]}],
        }
        with pytest.raises(FitError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            Job.from_mapping(doc, base_dir=str(tmp_path)).plan()


@pytest.mark.parametrize(
    ("weights", "needle"),
    [
        ([1, 1], "weights has 2 entries; it needs 1 + 2 = 3"),
        ([1, -1, 1], "finite and not negative"),
        ([0, 0, 0], "all zero"),
    ],
)
def test_bad_weights_fail_validation(weights: list[float], needle: str) -> None:
    doc = {
        "sources": {"a": "a.pt", "b": "b.pt"},
        "rules": [{"op": "average", "from": ["a", "b"], "weights": weights}],
    }
    with pytest.raises(RulesError, match=re.escape(needle)) as info:
        parse_document(doc)
    assert info.value.exit_code == 2


def test_an_op_naming_an_undeclared_source_fails_validation() -> None:
    with pytest.raises(RulesError, match="no source named 'ema'"):
        parse_rules([{"op": "take", "from": "ema", "pattern": "."}])  # the API: no sources
    with pytest.raises(RulesError, match=r"rules\[0\] \(average\).from: no source named 'c'"):
        parse_document({"sources": {"b": "b.pt"}, "rules": [{"op": "average", "from": ["b", "c"]}]})


# -- take ---------------------------------------------------------------------------------


def test_take_example_grafts_the_other_runs_head(run_cli, project: Path) -> None:
    proc = apply_example(run_cli, project, "take_from_other", "--verbose")
    assert "taken from head_run" in proc.stdout and "<- head_run:fc.weight" in proc.stdout
    out = load_file(project / "examples" / "out" / "resnet18_grafted.safetensors")
    backbone = state(project / "examples" / "checkpoints" / "resnet18_ep3.pth")
    head = load_file(project / "examples" / "checkpoints" / "resnet18_head_run.safetensors")
    assert sorted(out) == sorted(backbone)
    for name, tensor in out.items():
        expected = head[name] if name.startswith("fc.") else backbone[name]
        assert torch.equal(tensor, expected), name
    assert not torch.equal(head["fc.weight"], backbone["fc.weight"])


@pytest.fixture
def two_files(tmp_path: Path) -> Path:
    save_file({"enc.w": torch.zeros(2), "enc.b": torch.zeros(1)}, tmp_path / "main.safetensors")
    save_file(
        {"enc.w": torch.ones(2), "enc.b": torch.ones(1), "head.w": torch.full((3,), 2.0)},
        tmp_path / "other.safetensors",
    )
    return tmp_path


def take(folder: Path, **rule: object) -> tuple[dict[str, torch.Tensor], Plan]:
    doc = {
        "source": "main.safetensors",
        "sources": {"other": {"path": "other.safetensors"}},
        "rules": [{"op": "take", "from": "other", **rule}],
    }
    plan = Job.from_mapping(doc, base_dir=str(folder)).plan()
    return {n: r.load() for n, r in plan.table.items()}, plan


def test_take_renames_with_replace_and_appends(two_files: Path) -> None:
    out, plan = take(two_files, pattern=r"^enc\.(.*)", replace=r"teacher.\1")
    # the table's keys in their order, then the taken ones in the source's order
    assert list(out) == ["enc.b", "enc.w", "teacher.b", "teacher.w"]
    assert torch.equal(out["teacher.w"], torch.ones(2)) and torch.equal(
        out["enc.w"], torch.zeros(2)
    )
    entry = {e.name: e for e in plan.entries()}["teacher.w"]
    assert entry.sources == ("other:enc.w",) and [str(a) for a in entry.actions] == [
        "taken from other"
    ]


def test_take_collisions_and_overwrite(two_files: Path) -> None:
    with pytest.raises(FitError, match=r"'enc\.w' of source 'other' becomes 'enc\.w', which the"):
        take(two_files, pattern=r"^enc\.w")
    with pytest.raises(FitError, match=r"'enc\.w' and 'head\.w' of source 'other' both become 'x'"):
        take(two_files, pattern=r"^.*\.w$", replace="x", overwrite=True)
    out, _ = take(two_files, pattern=r"^enc\.w$", overwrite=True)
    assert list(out) == ["enc.b", "enc.w"]  # replaced in place, order kept
    assert torch.equal(out["enc.w"], torch.ones(2)) and torch.equal(out["enc.b"], torch.zeros(1))
    with pytest.raises(FitError, match="pattern 'nothing' in source 'other' matched no key"):
        take(two_files, pattern="nothing")


def test_sources_open_lazily_and_resolve_against_the_rules_file(two_files: Path, run_cli) -> None:
    # The rules file is elsewhere; its relative source paths are found from its folder. A
    # declared source no op reads is never opened (here it does not even exist).
    rules = two_files / "r" / "rules.yaml"
    rules.parent.mkdir()
    rules.write_text(
        "version: 1\nsource: ../main.safetensors\n"
        "sources:\n  other: ../other.safetensors\n  unused: ../nowhere.pth\n"
        "output: ../out.safetensors\n"
        "rules:\n  - {op: take, from: other, pattern: '^head'}\n"
    )
    proc = run_cli("apply", rules, cwd="/")  # relative paths: from the file, not the cwd
    assert proc.returncode == 0, proc.stderr
    assert sorted(load_file(two_files / "out.safetensors")) == ["enc.b", "enc.w", "head.w"]


def test_a_source_can_be_a_model_in_the_hf_cache(
    two_files: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import make_hf_cache

    model = tmp_path_factory.mktemp("model")
    shutil.copy(two_files / "other.safetensors", model / "model.safetensors")
    cache = tmp_path_factory.mktemp("cache")
    snapshot = make_hf_cache.make_cache(cache, model, repo_id="org/other")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    doc = {
        "source": "main.safetensors",
        "sources": {"hub": "hf://org/other"},
        "output": "out.safetensors",
        "rules": [{"op": "take", "from": "hub", "pattern": "^head"}],
    }
    made = Job.from_mapping(doc, base_dir=str(two_files))
    made.run()
    assert torch.equal(load_file(two_files / "out.safetensors")["head.w"], torch.full((3,), 2.0))
    assert str(snapshot) in made.input_paths()  # the name stands for its cache snapshot
    assert str(snapshot / "model.safetensors") in made.record()  # its files are recorded


# -- Stable Diffusion's EMA copy ---------------------------------------------------------


def test_sd_ema_example_is_litemas_copy_to(run_cli, project: Path) -> None:
    proc = apply_example(run_cli, project, "sd_ema_weights", "--verbose")
    assert "taken from ema" in proc.stdout
    ckpt = project / "examples" / "checkpoints" / "tiny_sd.ckpt"
    raw = state(ckpt)
    # The reference: CompVis' own EMA scope, LitEma.copy_to, on the model rebuilt.
    unet = make.tiny_unet()
    unet.load_state_dict({k[len("model.") :]: v for k, v in raw.items() if k.startswith("model.")})
    ema = make.LitEma(unet)
    ema.load_state_dict({k[len("model_ema.") :]: v for k, v in raw.items() if "model_ema." in k})
    ema.copy_to(unet)
    out = load_file(project / "examples" / "out" / "tiny_sd_ema.safetensors")
    expected = {f"model.{k}": v for k, v in unet.state_dict().items()}
    expected.update({k: v for k, v in raw.items() if k.startswith("first_stage_model.")})
    assert sorted(out) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(out[name], tensor), name
    weight = "model.diffusion_model.input_blocks.0.0.weight"
    assert not torch.equal(out[weight], raw[weight])  # the EMA copy differs from the weights


def test_dotless_copy_matches_only_one_entry_of_the_same_shape() -> None:
    t = {
        "model.a.b_c.weight": from_tensor(torch.zeros(2), "x"),
        "model.a_b.c.weight": from_tensor(torch.zeros(3), "y"),  # same dotless name, 3 long
        "model_ema.ab_cweight": from_tensor(torch.ones(2), "e"),
        "model_ema.decay": from_tensor(torch.tensor(0.9), "d"),
    }
    out = undotted(t, "model_ema", "f.ckpt")
    assert list(out) == ["model.a.b_c.weight"]  # the shape told them apart; decay left out
    t["model.q.a.b_c.weight"] = from_tensor(torch.zeros(2), "z")
    with pytest.raises(InputError, match="could shadow any of"):
        undotted(t, "model_ema", "f.ckpt")
    with pytest.raises(InputError, match="shadow no entry"):
        undotted({**out, "model_ema.zzz": from_tensor(torch.ones(2), "z")}, "model_ema.", "f")
    with pytest.raises(UsageError, match=re.escape("no entries named 'ema_model.*'")):
        undotted(t, "ema_model", "f.ckpt")


# -- dequantize ---------------------------------------------------------------------------


def blockwise_reference(weight: torch.Tensor, scale: torch.Tensor, block: int = 128):
    """DeepSeek-V3's dequantization written block by block: each b x b block (edge blocks
    partial) of the float8 weight, as float32, times its own scale element."""
    out = torch.empty(weight.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = weight[rows, cols].to(torch.float32) * scale[i, j]
    return out


def test_dequantize_example_against_a_blockwise_reference(run_cli, project: Path) -> None:
    proc = apply_example(run_cli, project, "dequantize_fp8", "--verbose")
    assert "dropped layers.0.mlp.up_proj.weight_scale_inv" in proc.stdout
    src = load_file(project / "examples" / "checkpoints" / "fp8_blockwise.safetensors")
    out = load_file(project / "examples" / "out" / "bf16.safetensors")
    assert sorted(out) == sorted(n for n in src if not n.endswith("_scale_inv"))
    for name, (rows, cols) in make.FP8_SHAPES.items():
        weight = src[f"{name}.weight"]
        assert weight.dtype == torch.float8_e4m3fn and (rows % 128, cols % 128) != (0, 0)
        expected = blockwise_reference(weight, src[f"{name}.weight_scale_inv"])
        got = out[f"{name}.weight"]
        assert got.dtype == torch.bfloat16 and torch.equal(got, expected.to(torch.bfloat16))
    assert torch.equal(out["layers.0.norm.weight"], src["layers.0.norm.weight"])


def test_dequantize_float32_e5m2_and_a_per_tensor_scale(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(130, 7, generator=gen).to(torch.float8_e5m2)
    s = torch.rand(2, 1, generator=gen) + 0.5
    v = torch.randn(5, 4, generator=gen).to(torch.float8_e4m3fn)
    save_file({"a.weight": w, "a.scale": s, "b.weight": v, "b.scale": torch.tensor([3.0])},
              tmp_path / "q.safetensors")  # fmt: skip
    doc = {
        "source": "q.safetensors",
        "rules": [{"op": "dequantize", "pattern": r"\.weight$", "scale": ".scale",
                   "block": [128, 128], "dtype": "float32"}],
    }  # fmt: skip
    plan = Job.from_mapping(doc, base_dir=str(tmp_path)).plan()
    out = materialise(plan.table)
    assert torch.equal(out["a.weight"], blockwise_reference(w, s))
    assert torch.equal(out["b.weight"], v.to(torch.float32) * 3.0)
    assert set(plan.dropped) == {"a.scale", "b.scale"}


def test_dequantize_a_scale_of_the_wrong_shape_is_a_fit_error(tmp_path: Path) -> None:
    w = torch.zeros(300, 200).to(torch.float8_e4m3fn)
    save_file({"l.weight": w, "l.weight_scale_inv": torch.ones(2, 2)}, tmp_path / "q.safetensors")
    doc = {
        "source": "q.safetensors",
        "rules": [{"op": "dequantize", "pattern": r"\.weight$", "scale": r"\g<0>_scale_inv"}],
    }
    with pytest.raises(FitError, match=r"is \[2, 2\]; blocks of \[128, 128\] need \[3, 2\]"):
        Job.from_mapping(doc, base_dir=str(tmp_path)).plan()


def test_float8_tensors_survive_a_safetensors_round_trip(tmp_path: Path) -> None:
    w = torch.randn(33, 17).to(torch.float8_e4m3fn)
    v = torch.randn(9).to(torch.float8_e5m2)
    save_file({"w": w, "v": v, "x": torch.ones(2)}, tmp_path / "q.safetensors")
    doc = {
        "source": "q.safetensors",
        "output": "o.safetensors",
        "rules": [{"op": "drop", "pattern": "^x$"}],
    }
    Job.from_mapping(doc, base_dir=str(tmp_path)).run()
    got = load_file(tmp_path / "o.safetensors")
    assert got["w"].dtype == torch.float8_e4m3fn and got["v"].dtype == torch.float8_e5m2
    assert torch.equal(got["w"].view(torch.uint8), w.view(torch.uint8))
    assert torch.equal(got["v"].view(torch.uint8), v.view(torch.uint8))
    table = open_checkpoint(tmp_path / "o.safetensors").tensors  # our reader, too
    assert torch.equal(table["w"].load().view(torch.uint8), w.view(torch.uint8))


# -- bad input through the CLI; the up-to-date record -------------------------------------


@pytest.mark.parametrize(
    ("sources", "rule", "code", "needle"),
    [
        ("  b: other.safetensors\n", "{op: take, from: ema, pattern: x}", 2,
         "rules[0] (take).from: no source named 'ema' under sources: (declared: 'b')"),
        ("  b: gone.safetensors\n", "{op: average, from: [b]}", 3,
         "sources.b: "),
        ("  b: other.safetensors\n", "{op: average, from: [b], weights: [1]}", 2,
         "weights has 1 entries; it needs 1 + 1 = 2"),
        ("  b: other.safetensors\n",
         "{op: dequantize, pattern: 'w$', scale: '\\g<0>_scale_inv'}", 1,
         "float8 'enc.w' has no scale tensor 'enc.w_scale_inv'"),
    ],
)  # fmt: skip
def test_bad_input_exits_cleanly_and_writes_nothing(
    run_cli, tmp_path: Path, sources: str, rule: str, code: int, needle: str
) -> None:
    save_file({"enc.w": torch.zeros(4).to(torch.float8_e4m3fn)}, tmp_path / "main.safetensors")
    save_file({"enc.w": torch.ones(4)}, tmp_path / "other.safetensors")
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"version: 1\nsource: main.safetensors\noutput: out.safetensors\nsources:\n{sources}"
        f"rules:\n  - {rule}\n"
    )
    proc = run_cli("apply", rules)
    assert_clean_failure(proc, code, needle)
    assert not (tmp_path / "out.safetensors").exists()
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != "rules.yaml"}
    assert after == before


def test_a_changed_source_makes_the_output_stale(two_files: Path) -> None:
    doc = {
        "source": "main.safetensors",
        "sources": {"other": "other.safetensors"},
        "output": "out.safetensors",
        "rules": [{"op": "average", "from": ["other"]}],
    }
    made = Job.from_mapping(doc, base_dir=str(two_files))
    assert not made.up_to_date()
    made.run()
    assert made.up_to_date()
    other = two_files / "other.safetensors"
    assert str(other) in made.input_paths()
    stat = other.stat()
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert not made.up_to_date()  # the source changed: the step reruns
    made.run()
    assert made.up_to_date()
