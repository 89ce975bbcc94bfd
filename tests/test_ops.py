"""Each rule op's behaviour on a small in-memory table."""

from __future__ import annotations

import pytest
import torch
from conftest import materialise

from ckptsurgeon.engine.plan import run_rules
from ckptsurgeon.errors import FitError, RulesError
from ckptsurgeon.formats.table import from_tensor
from ckptsurgeon.rules.document import parse_rules
from ckptsurgeon.targets.spec import TargetInfo, expected_from_model


def table(**tensors: torch.Tensor):
    return {
        name.replace("__", "."): from_tensor(t, name.replace("__", "."))
        for name, t in tensors.items()
    }


def run(rules: list[dict], tbl, target=None, seed: int = 0):
    out, dropped = run_rules(parse_rules({"rules": rules, "seed": seed}), tbl, target)
    return out, dropped


def test_strip_and_add_prefix() -> None:
    t = table(module__a=torch.ones(1), module__b=torch.ones(2), c=torch.ones(3))
    out, _ = run([{"op": "strip_prefix", "prefix": "module."}], t)
    assert list(out) == ["a", "b", "c"]
    assert [str(a) for a in out["a"].actions] == ["stripped from module.a"]
    out, _ = run([{"op": "add_prefix", "prefix": "backbone.", "pattern": "^[ab]$"}], out)
    assert list(out) == ["backbone.a", "backbone.b", "c"]


def test_rename_uses_groups_and_named_groups() -> None:
    t = table(blocks__0__w=torch.ones(1), blocks__11__w=torch.ones(1))
    out, _ = run(
        [{"op": "rename", "pattern": r"^blocks\.(?P<i>\d+)\.", "replace": r"layer.\g<i>."}], t
    )
    assert list(out) == ["layer.0.w", "layer.11.w"]


def test_collision_names_both_sources() -> None:
    t = table(module__fc=torch.ones(1), fc=torch.ones(1))
    with pytest.raises(FitError, match=r"'module\.fc' and 'fc' both become 'fc'"):
        run([{"op": "strip_prefix", "prefix": "module."}], t)


def test_no_match_is_an_error_unless_optional() -> None:
    t = table(a=torch.ones(1))
    with pytest.raises(FitError, match=r"rules\[0\] \(drop\): pattern '\^zzz' matched no key"):
        run([{"op": "drop", "pattern": "^zzz"}], t)
    out, _ = run([{"op": "drop", "pattern": "^zzz", "optional": True}], t)
    assert list(out) == ["a"]


def test_map_requires_every_old_name() -> None:
    t = table(a=torch.ones(1), b=torch.ones(1))
    out, _ = run([{"op": "map", "mapping": {"a": "x"}}], t)
    assert list(out) == ["x", "b"]
    with pytest.raises(FitError, match="not in the checkpoint: 'typo'"):
        run([{"op": "map", "mapping": {"a": "x", "typo": "y"}}], t)


def test_drop_and_keep_record_reasons() -> None:
    t = table(a=torch.ones(1), aux__w=torch.ones(1), b=torch.ones(1))
    out, dropped = run([{"op": "drop", "pattern": r"^aux\."}], t)
    assert list(out) == ["a", "b"] and list(dropped) == ["aux.w"]
    out, dropped = run([{"op": "keep", "pattern": "^a$"}], t)
    assert list(out) == ["a"] and sorted(dropped) == ["aux.w", "b"]


def test_cast_without_pattern_leaves_integers() -> None:
    t = table(w=torch.randn(2), n=torch.tensor(3))
    out, _ = run([{"op": "cast", "dtype": "bf16"}], t)
    assert out["w"].dtype == torch.bfloat16 and out["n"].dtype == torch.int64
    assert torch.equal(out["w"].load(), t["w"].load().bfloat16())


def test_transpose_and_reshape() -> None:
    w = torch.arange(6.0).reshape(2, 3)
    out, _ = run(
        [{"op": "transpose", "pattern": "w"}, {"op": "reshape", "pattern": "w", "shape": [-1]}],
        table(w=w),
    )
    assert out["w"].shape == (6,)
    assert torch.equal(out["w"].load(), w.t().reshape(-1))


def test_reshape_to_wrong_numel_fails_at_planning() -> None:
    with pytest.raises(FitError, match=r"rules\[0\] \(reshape\): 'w' \[2, 3\]"):
        run([{"op": "reshape", "pattern": "w", "shape": [4]}], table(w=torch.ones(2, 3)))


def test_split_and_merge_round_trip() -> None:
    qkv = torch.randn(12, 4)
    t = table(blk__qkv__weight=qkv, other=torch.ones(1))
    rules = [
        {
            "op": "split",
            "pattern": r"^(.*)\.qkv\.(\w+)$",
            "into": [r"\1.q.\2", r"\1.k.\2", r"\1.v.\2"],
        }
    ]
    out, _ = run(rules, t)
    assert list(out) == ["blk.q.weight", "blk.k.weight", "blk.v.weight", "other"]
    assert torch.equal(out["blk.k.weight"].load(), qkv[4:8])
    back, _ = run(
        [
            {
                "op": "merge",
                "pattern": r"^(.*)\.(q|k|v)\.(\w+)$",
                "group": 2,
                "order": ["q", "k", "v"],
                "into": r"\1.qkv.\3",
            }
        ],
        out,
    )
    assert list(back) == ["blk.qkv.weight", "other"]
    assert torch.equal(back["blk.qkv.weight"].load(), qkv)


def test_split_with_sizes_and_bad_sizes() -> None:
    t = table(w=torch.arange(10.0))
    out, _ = run([{"op": "split", "pattern": "^w$", "into": ["a", "b"], "sizes": [3, 7]}], t)
    assert out["b"].shape == (7,)
    with pytest.raises(FitError, match="sum to 9"):
        run([{"op": "split", "pattern": "^w$", "into": ["a", "b"], "sizes": [3, 6]}], t)


def test_split_sizes_must_be_positive() -> None:
    t = table(w=torch.arange(10.0))
    with pytest.raises(RulesError, match="greater than 0"):
        run([{"op": "split", "pattern": "^w$", "into": ["a", "b"], "sizes": [-2, 12]}], t)


def test_resize_by_mean_of_an_empty_dim_is_an_error() -> None:
    rule = {"op": "resize", "pattern": "w", "dim": 0, "size": 2, "init": "mean"}
    with pytest.raises(FitError, match="no mean; use init: zeros or normal"):
        run([rule], table(w=torch.empty(0, 3)))
    out, _ = run([{**rule, "init": "zeros"}], table(w=torch.empty(0, 3)))
    assert torch.equal(out["w"].load(), torch.zeros(2, 3))


def test_merge_missing_partner_is_an_error() -> None:
    t = table(x__q=torch.ones(2), x__k=torch.ones(2))
    with pytest.raises(FitError, match=r"no partner for \['v'\]"):
        run(
            [
                {
                    "op": "merge",
                    "pattern": r"^x\.(q|k|v)$",
                    "order": ["q", "k", "v"],
                    "into": "x.qkv",
                }
            ],
            t,
        )


def test_copy_duplicates() -> None:
    t = table(emb=torch.randn(3, 2))
    out, _ = run([{"op": "copy", "pattern": "^emb$", "replace": "lm_head"}], t)
    assert torch.equal(out["lm_head"].load(), out["emb"].load())
    with pytest.raises(FitError, match="both become"):
        run(
            [
                {"op": "copy", "pattern": "^emb$", "replace": "emb2"},
                {"op": "copy", "pattern": "^emb2?$", "replace": "emb2"},
            ],
            t,
        )


@pytest.mark.parametrize("init", ["zeros", "normal", "mean"])
def test_resize_pads_and_truncates(init: str) -> None:
    w = torch.randn(4, 3)
    out, _ = run([{"op": "resize", "pattern": "w", "dim": 0, "size": 6, "init": init}], table(w=w))
    got = out["w"].load()
    assert got.shape == (6, 3) and torch.equal(got[:4], w)
    if init == "zeros":
        assert torch.count_nonzero(got[4:]) == 0
    if init == "mean":
        torch.testing.assert_close(got[4], w.mean(0))
    out, _ = run([{"op": "resize", "pattern": "w", "dim": 0, "size": 2}], table(w=w))
    assert torch.equal(out["w"].load(), w[:2])


def test_adapt_input_channels_matches_timm() -> None:
    from timm.models._manipulate import adapt_input_conv

    w = torch.randn(8, 3, 3, 3)
    for channels in (1, 2, 4, 7):
        out, _ = run(
            [{"op": "adapt_input_channels", "pattern": "w", "channels": channels}], table(w=w)
        )
        torch.testing.assert_close(out["w"].load(), adapt_input_conv(channels, w.clone()))


def test_reinit_and_fill_from_a_model_target_are_seeded() -> None:
    def make() -> TargetInfo:
        with torch.device("meta"):
            model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
        return TargetInfo("model", expected_from_model(model), model)

    t = table(
        **{
            "0__weight": torch.randn(8, 4),
            "0__bias": torch.randn(8),
            "1__weight": torch.randn(5, 8),
        }
    )
    rules = [{"op": "reinit_mismatched"}, {"op": "fill_missing"}]
    a = materialise(run(rules, t, make(), seed=1)[0])
    b = materialise(run(rules, t, make(), seed=1)[0])
    c = materialise(run(rules, t, make(), seed=2)[0])
    assert a["1.weight"].shape == (3, 8) and a["1.bias"].shape == (3,)
    assert torch.equal(a["1.weight"], b["1.weight"]) and torch.equal(a["1.bias"], b["1.bias"])
    assert not torch.equal(a["1.weight"], c["1.weight"])
    assert torch.equal(a["0.weight"], t["0.weight"].load())  # untouched keys stay as they were


def test_manifest_targets_need_init() -> None:
    target = TargetInfo("manifest m", {"w": ((3,), torch.float32)})
    with pytest.raises(FitError, match="give init"):
        run([{"op": "fill_missing"}], {}, target)
    out, _ = run([{"op": "fill_missing", "init": "zeros"}], {}, target)
    assert torch.equal(out["w"].load(), torch.zeros(3))


def test_unknown_fields_and_bad_regex_are_rules_errors() -> None:
    with pytest.raises(RulesError, match="unknown field"):
        parse_rules([{"op": "drop", "pattern": "x", "patern": "y"}])
    with pytest.raises(RulesError, match="invalid regular expression"):
        parse_rules([{"op": "drop", "pattern": "("}])
    with pytest.raises(RulesError, match="unknown op 'frobnicate'"):
        parse_rules([{"op": "frobnicate"}])


def test_fill_missing_copies_a_tied_weight_instead_of_overwriting_it() -> None:
    """A GPT-2 state dict as save_pretrained writes it has no lm_head.weight (tied to the
    embedding): filling it with fresh values would overwrite the trained embedding when
    load_state_dict writes the later key into the shared parameter."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=8)
    trained = GPT2LMHeadModel(config)
    state = {k: v for k, v in trained.state_dict().items() if k != "lm_head.weight"}
    target = TargetInfo(
        "model", expected_from_model(GPT2LMHeadModel(config)), GPT2LMHeadModel(config)
    )
    out, _ = run(
        [{"op": "fill_missing"}],
        table(**{k.replace(".", "__"): v for k, v in state.items()}),
        target,
    )
    assert "tied in the target" in str(out["lm_head.weight"].actions[-1])
    fresh = GPT2LMHeadModel(config)
    fresh.load_state_dict(materialise(out), strict=True)
    assert torch.equal(fresh.transformer.wte.weight, state["transformer.wte.weight"])


def test_reinit_mismatched_keeps_what_load_state_dict_accepts() -> None:
    """A [1] tensor loads into a 0-dim parameter (CLIP's logit_scale is often stored so):
    not a mismatch, so its trained value is kept."""

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.logit_scale = torch.nn.Parameter(torch.tensor(2.6592))
            self.proj = torch.nn.Linear(2, 3)

    model = Scaled()
    target = TargetInfo("model", expected_from_model(model), model)
    t = table(
        logit_scale=torch.tensor([4.6052]), proj__weight=torch.ones(5, 2), proj__bias=torch.ones(3)
    )
    out, _ = run([{"op": "reinit_mismatched"}], t, target)
    assert torch.equal(out["logit_scale"].load(), torch.tensor([4.6052]))
    assert out["proj.weight"].shape == (3, 2)
    Scaled().load_state_dict(materialise(out), strict=True)
