"""`diff` and `diff --suggest`, tried as a new user would.

For checkpoints written by the real libraries (DataParallel, Lightning, torch.compile in a
training container, a torchvision detector, a Hugging Face encoder, timm), the suggested
rules file is saved as printed, then `apply` must write a file that passes the strict check
and keeps every reused tensor bit for bit. The other tests cover what must never be
guessed (ambiguity, look-alike renames), the JSON form, two-checkpoint diffs, and the
fused-projection split/merge on small real torch modules (tests/diff_models.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import REPO, assert_clean_failure

from ckptsurgeon.cli import cli
from ckptsurgeon.formats import open_checkpoint
from ckptsurgeon.rules.document import load_rules
from ckptsurgeon.suggest.names import cover

sys.path.insert(0, str(REPO / "examples"))
import diff_models as toy
import make_checkpoints as make

MODELS = Path(__file__).with_name("diff_models.py")
RESNET18_10 = ("--target", "torchvision.models:resnet18", "--kwargs", '{"num_classes": 10}')
BERT_CLASSIFIER = (
    "--target",
    "transformers:BertForSequenceClassification",
    "--kwargs",
    json.dumps({**make.BERT, "num_labels": 3}),
)


def detector(folder: Path) -> Path:
    """A torchvision Faster R-CNN on a resnet18 FPN backbone, in a training container.

    ``backbone.body.*`` is the resnet (with FrozenBatchNorm2d, which saves no
    ``num_batches_tracked``); ``backbone.fpn.*``, ``rpn.*`` and ``roi_heads.*`` have no
    counterpart in a plain classifier. The box head is made small to keep the file small.
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    torch.manual_seed(6)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    model = FasterRCNN(
        backbone, box_head=TwoMLPHead(256 * 7 * 7, 64), box_predictor=FastRCNNPredictor(64, 3)
    )
    path = folder / "detector.pth"
    torch.save({"model": model.state_dict(), "iteration": 100}, path)
    return path


# maker, target flags, the rules `--suggest` must print (in order)
SCENARIOS = {
    "dataparallel": (
        make.resnet18_dp,
        RESNET18_10,
        [
            {"op": "strip_prefix", "prefix": "module."},
            {"op": "reinit_mismatched", "pattern": r"^fc\."},
        ],
    ),
    "lightning": (
        make.resnet18_lightning,
        RESNET18_10,
        [{"op": "strip_prefix", "prefix": "model."}],
    ),
    "compiled_container": (
        make.resnet18_compiled_train,
        RESNET18_10,
        [{"op": "strip_prefix", "prefix": "_orig_mod."}],
    ),
    "detector": (
        detector,
        RESNET18_10,
        [
            {"op": "drop", "pattern": r"^backbone\.fpn\."},
            {"op": "drop", "pattern": r"^roi_heads\."},
            {"op": "drop", "pattern": r"^rpn\."},
            {"op": "strip_prefix", "prefix": "backbone.body."},
            {"op": "fill_missing", "pattern": r"(?:^|\.)num_batches_tracked$"},
            {"op": "fill_missing", "pattern": r"^fc\."},
        ],
    ),
    "hf_encoder": (
        make.bert_encoder,
        BERT_CLASSIFIER,
        [
            {"op": "add_prefix", "prefix": "bert."},
            {"op": "fill_missing", "pattern": r"^classifier\."},
        ],
    ),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_suggested_rules_apply_cleanly(scenario: str, tmp_path: Path, run_cli) -> None:
    maker, target, expected_rules = SCENARIOS[scenario]
    (tmp_path / "ckpts").mkdir()
    source = maker(tmp_path / "ckpts").relative_to(tmp_path)

    # As a user would: a relative path, the rules file saved in another folder.
    proc = run_cli("diff", source, *target, "--suggest", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stderr
    (tmp_path / "rules").mkdir()
    rules = tmp_path / "rules" / "suggested.yaml"
    rules.write_text(proc.stdout)
    assert yaml.safe_load(proc.stdout)["rules"] == expected_rules
    assert load_rules(rules).output is None  # left for the user

    out = tmp_path / "out.safetensors"
    applied = invoke("apply", rules, "--output", out, "--json")  # the same CLI, in this process
    assert applied.exit_code == 0, applied.output
    report = json.loads(applied.stdout)
    assert report["check"]["ok"] and report["written"]["path"] == str(out)

    # Every tensor not re-initialised is the checkpoint's own, bit for bit.
    spec = load_rules(rules).source_spec
    original = open_checkpoint(spec.path, spec.key).tensors
    written = open_checkpoint(out).tensors
    for entry in report["keys"]:
        if not any(a.startswith(("reinit", "filled")) for a in entry["actions"]):
            ours, theirs = written[entry["name"]].load(), original[entry["sources"][0]].load()
            assert torch.equal(ours, theirs), entry["name"]


def test_every_rule_says_why_and_how_many_keys(tmp_path: Path) -> None:
    src = make.resnet18_dp(tmp_path)
    result = invoke("diff", src, *RESNET18_10, "--suggest")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "  # every checkpoint key carries 'module.' (122 keys)\n  - op: strip_prefix\n" in text
    assert "  # fc.*: 1000 -> 10 along dim 0: fresh values" in text
    assert "prefix: 'module.'" in text and r"pattern: '^fc\.'" in text  # single-quoted
    assert (
        "\noutput: null" in text and "Verified: with these rules, A loads strictly into B" in text
    )

    plain = invoke("diff", src, *RESNET18_10)  # the same findings, for a person
    assert plain.exit_code == 1  # they differ, as Unix diff says
    assert "every checkpoint key carries 'module.' (122 keys)" in plain.stdout
    assert "0 in common, 122 only in A, 122 only in B" in plain.stdout
    assert "reconcilable: `diff --suggest` prints 2 rules" in plain.stdout


def test_timm_and_torchvision_resnet18_do_not_differ(tmp_path: Path, run_cli) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(7)
    src = tmp_path / "timm_resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), src)

    proc = run_cli("diff", src, "--target", "torchvision.models:resnet18", "--suggest")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["rules"] == []
    assert "A already loads strictly into B: there is nothing to change" in proc.stdout

    plain = invoke("diff", src, "--target", "torchvision.models:resnet18")
    assert plain.exit_code == 0, plain.output
    assert "identical: the same names, shapes and dtypes" in plain.stdout


def test_old_hf_checkpoint_drops_non_persistent_position_ids(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = make.bert_encoder(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["embeddings.position_ids"] = torch.arange(64).unsqueeze(0)  # transformers < 4.31
    src = tmp_path / "bert_old.safetensors"
    save_file(tensors, src)

    rules = suggest_and_apply(tmp_path, src, *BERT_CLASSIFIER)
    assert rules[0] == {"op": "drop", "pattern": r"^embeddings\.position_ids$"}
    assert "non-persistent" in (tmp_path / "suggested.yaml").read_text()


def test_ema_copy_dropped_and_raw_weights_used(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = toy.FusedNet().state_dict()
    ckpt = {f"model.{k}": v for k, v in state.items()}
    ckpt.update({f"model_ema.{k}": v + 1 for k, v in state.items()})
    src = tmp_path / "ema.pt"
    torch.save({"state_dict": ckpt}, src)

    rules = suggest_and_apply(tmp_path, src, "--target", f"{MODELS}:FusedNet")
    assert rules == [
        {"op": "drop", "pattern": r"^model_ema\."},
        {"op": "strip_prefix", "prefix": "model."},
    ]
    assert "an EMA copy" in (tmp_path / "suggested.yaml").read_text()
    written = open_checkpoint(tmp_path / "out.safetensors").tensors
    assert torch.equal(written["head.weight"].load(), state["head.weight"])


def test_per_layer_renames_fold_into_one_regex(tmp_path: Path) -> None:
    src = tmp_path / "blocks.pt"
    torch.save(toy.SplitBlocksNet().state_dict(), src)
    rules = suggest_and_apply(tmp_path, src, "--target", f"{MODELS}:RenamedAttentionNet")
    assert rules == [
        {
            "op": "rename",
            "pattern": r"^blocks\.(\d+)\.attn\.",
            "replace": r"layers.\g<1>.attention.",
        },
        {"op": "rename", "pattern": r"^blocks\.", "replace": "layers."},
    ]


def test_fused_qkv_split_and_merged_between_two_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fused, split = tmp_path / "fused.pt", tmp_path / "split.pt"
    fused_state = toy.FusedNet(num_classes=4).state_dict()
    torch.save(fused_state, fused)
    torch.save(toy.SplitNet(num_classes=7).state_dict(), split)

    rules = suggest_and_apply(tmp_path, fused, split)  # diff A B: B is the target
    assert [r["op"] for r in rules] == ["rename", "split", "reinit_mismatched", "reinit_mismatched"]
    split_rule = rules[1]
    assert split_rule["pattern"] == r"^layers\.(\d+)\.attn\.qkv\.(bias|weight)$"
    assert split_rule["into"][0] == r"layers.\g<1>.attn.q_proj.\g<2>"
    assert [r.get("init") for r in rules[2:]] == ["normal", "zeros"]  # no model to ask
    written = open_checkpoint(tmp_path / "out.safetensors").tensors
    qkv = fused_state["blocks.1.attn.qkv.weight"]
    assert torch.equal(written["layers.1.attn.k_proj.weight"].load(), qkv[8:16])

    back = tmp_path / "back"
    back.mkdir()
    merged = suggest_and_apply(back, tmp_path / "out.safetensors", "--target", f"{MODELS}:FusedNet")
    assert [r["op"] for r in merged] == ["rename", "merge", "reinit_mismatched"]
    restored = open_checkpoint(back / "out.safetensors").tensors
    assert torch.equal(restored["blocks.1.attn.qkv.weight"].load(), qkv)


def test_ambiguity_is_reported_never_guessed(tmp_path: Path) -> None:
    src = tmp_path / "single.pt"
    torch.save(toy.Single().state_dict(), src)
    result = invoke("diff", src, "--target", f"{MODELS}:EncoderDecoder", "--suggest")
    assert result.exit_code == 1
    message = (
        "ambiguous: checkpoint keys 'proj.*' match 'decoder.proj.*' and 'encoder.proj.*' "
        "equally well (same common suffix, same shape); not guessed"
    )
    assert message in result.stderr
    rules = tmp_path / "r.yaml"
    rules.write_text(result.stdout)  # still a valid file, saying what is left
    assert load_rules(rules).rules == []
    assert "# NOT RECONCILED" in result.stdout and message in result.stdout


def test_what_cannot_be_reconciled_exits_1_naming_the_keys(tmp_path: Path) -> None:
    src = tmp_path / "ln.pt"
    torch.save(toy.FusedNet(norm="ln").state_dict(), src)
    result = invoke("diff", src, "--target", f"{MODELS}:FusedNet", "--suggest")
    assert result.exit_code == 1
    assert "missing from the checkpoint (6): blocks.0.norm.{weight,bias}" in result.stderr
    assert "unexpected by the target (6): blocks.0.ln.{weight,bias}" in result.stderr
    assert (
        "target module 'blocks.N.norm.*' (3 modules) has no match by name, but checkpoint "
        "module 'blocks.N.ln.*' holds the same tensors: renamed? Not guessed"
    ) in result.stderr
    assert yaml.safe_load(result.stdout)["rules"] == []  # trained weights never silently replaced


def test_nothing_in_common_is_not_reconciled(tmp_path: Path) -> None:
    src = tmp_path / "single.pt"
    torch.save(toy.Single().state_dict(), src)
    result = invoke(
        "diff",
        src,
        "--target",
        "torch.nn:Conv2d",
        "--kwargs",
        '{"in_channels": 3, "out_channels": 4, "kernel_size": 3}',
    )
    assert result.exit_code == 1
    assert "no checkpoint key corresponds to a target key by name" in result.stdout


def test_json_form(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = tmp_path / "dp.pt"
    torch.save(torch.nn.DataParallel(toy.Single()).state_dict(), src)
    result = invoke("diff", src, "--target", f"{MODELS}:Single", "--json", "--suggest")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["identical"] is False and report["reconciled"] is True
    assert report["only_in_a"] == [
        "module.proj.weight",
        "module.proj.bias",
        "module.head.weight",
        "module.head.bias",
    ]
    assert len(report["only_in_b"]) == 4 and report["remaining"] == []
    assert report["findings"] == [
        {
            "kind": "strip_prefix",
            "summary": "every checkpoint key carries 'module.'",
            "keys": 4,
            "rule": {"op": "strip_prefix", "prefix": "module."},
        }
    ]
    assert yaml.safe_load(report["rules_file"])["rules"] == [report["findings"][0]["rule"]]


def test_diff_between_two_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.pt"
    from safetensors.torch import save_file

    state = toy.FusedNet().state_dict()
    save_file({k: v.half() for k, v in state.items() if not k.startswith("head.")}, a)
    torch.save(state, b)
    result = invoke("diff", a, b)
    assert result.exit_code == 1
    assert "30 in common, 0 only in A, 2 only in B, 0 shapes and 30 dtypes differ" in result.stdout
    assert "head.*: only the target has them (36 values)" in result.stdout
    assert "float16 in the checkpoint, float32 in the target" in result.stdout
    assert invoke("diff", b, b).exit_code == 0


def test_usage_errors(tmp_path: Path) -> None:
    src = tmp_path / "s.pt"
    torch.save(toy.Single().state_dict(), src)
    for args in ([src], [src, src, "--target", "torch.nn:Identity"], [src, src, "--kwargs", "{}"]):
        result = invoke("diff", *args)
        assert result.exit_code == 2, result.output
    assert invoke("diff", src, tmp_path / "nope.pt").exit_code == 3


def test_suggest_through_the_real_cli_reports_remaining_on_stderr(tmp_path: Path, run_cli) -> None:
    src = tmp_path / "single.pt"
    torch.save(toy.Single().state_dict(), src)
    proc = run_cli("diff", src, "--target", f"{MODELS}:EncoderDecoder", "--suggest")
    assert_clean_failure(proc, 1, "not reconciled", "not guessed")


def test_cover_picks_few_exact_patterns() -> None:
    dropped = ["rpn.head.w", "rpn.head.b", "h.0.attn.bias", "h.1.attn.bias", "x.position_ids"]
    kept = ["h.0.attn.weight", "h.1.attn.weight", "x.emb", "rpn_thing.w"]
    groups = cover(dropped, kept)
    assert [g.pattern for g in groups] == [
        r"^rpn\.",
        r"^h\.\d+\.attn\.bias$",
        r"^x\.position_ids$",
    ]
    assert [g.label for g in groups] == ["rpn.*", "h.N.attn.bias", "x.position_ids"]
    import re

    for group in groups:
        assert not any(re.search(group.pattern, k) for k in kept)


def invoke(*args: object):
    """The CLI in this process (stdout and stderr kept apart)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def suggest_and_apply(folder: Path, source: Path, *target: str) -> list[dict]:
    """`diff --suggest`, the YAML saved as printed, then `apply` it; returns the rules."""
    result = invoke("diff", source, *target, "--suggest")
    assert result.exit_code == 0, result.output
    rules = folder / "suggested.yaml"
    rules.write_text(result.stdout)
    applied = invoke("apply", rules, "--output", folder / "out.safetensors")
    assert applied.exit_code == 0, applied.output
    return yaml.safe_load(result.stdout)["rules"]


def test_fresh_norm_scales_start_at_one_without_a_model(tmp_path: Path) -> None:
    """Against a manifest there is no model to initialise from: a suggested LayerNorm scale or
    running variance starts at one (zeros would silence the layer), biases at zero."""
    from ckptsurgeon.engine.plan import run_rules
    from ckptsurgeon.suggest import compare
    from ckptsurgeon.targets.spec import TargetInfo

    model = torch.nn.Module()
    model.proj, model.norm, model.bn = (
        torch.nn.Linear(4, 4),
        torch.nn.LayerNorm(4),
        torch.nn.BatchNorm1d(4),
    )
    full = model.state_dict()
    target = TargetInfo("manifest m", {n: (tuple(t.shape), t.dtype) for n, t in full.items()})
    torch.save(
        {"proj.weight": full["proj.weight"], "proj.bias": full["proj.bias"]}, tmp_path / "p.pt"
    )
    source = open_checkpoint(tmp_path / "p.pt")
    report = compare(source, target)
    assert report.reconciled
    assert {r.init for r in report.rules.rules if r.op == "fill_missing"} == {"ones", "zeros"}
    out, _ = run_rules(report.rules, source.tensors, target)
    for name in ("norm.weight", "bn.weight", "bn.running_var"):
        assert torch.equal(out[name].load(), torch.ones(4)), name
    for name in ("norm.bias", "bn.bias", "bn.running_mean"):
        assert torch.equal(out[name].load(), torch.zeros(4)), name
