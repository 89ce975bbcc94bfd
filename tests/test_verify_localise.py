"""Verification names the culprit where conversions are hardest: through ``permute_rope``,
``split`` and transposes, with real transformers models converted through the CLI.

Each wrong conversion below loads strictly (every shape is right) and computes something
else; ``apply`` must exit 4, write nothing, and name the module where the difference
arises. Each right conversion must pass. And inputs that cannot show a change are warned
about (a length-1 sequence hides a missing ``permute_rope``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO

transformers = pytest.importorskip("transformers")

NANOGPT = Path(__file__).with_name("nanogpt.py")
TOKENS = [{"name": "input_ids", "shape": [2, 8], "dtype": "int64", "high": 64}]


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Weights far from initialisation, as a trained model's: attention far from uniform,
    norms far from one, so that a wrong conversion shows well above rounding."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name or "ln" in name else 0))
            else:
                p.normal_(0.0, 0.3)
    return model


def _rules(
    tmp_path: Path,
    source: Path,
    rules: list[dict],
    target: tuple[str, dict],
    reference: tuple[str, dict],
    inputs: list[dict] = TOKENS,
) -> Path:
    doc: dict[str, Any] = {
        "version": 1,
        "source": str(source),
        "target": {"model": target[0], "kwargs": target[1]},
        "output": str(tmp_path / "out.safetensors"),
        "rules": rules,
        "verify": {"reference": {"model": reference[0], "kwargs": reference[1]}, "inputs": inputs},
    }
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _first_divergence(run_cli, rules: Path) -> dict:
    """Apply ``rules``, which must fail verification cleanly; the report's first divergence."""
    proc = run_cli("apply", rules, "--json")
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (rules.parent / "out.safetensors").exists()
    first = json.loads(proc.stdout)["verify"]["first_divergence"]
    assert first is not None, proc.stdout
    assert f"first module to diverge: {first['candidate']}" in proc.stderr
    return first


# -- Phi-3 "llamafied": fused qkv_proj and gate_up_proj split ---------------------------

PHI3 = {
    "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "pad_token_id": 0,
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
LLAMA = {k: v for k, v in PHI3.items()}


@pytest.fixture(scope="module")
def phi3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("phi3") / "phi3"
    model = _trained_like(transformers.Phi3ForCausalLM(transformers.Phi3Config(**PHI3)))
    model.save_pretrained(folder)
    return folder


def _llamafy(gate_up: list[str]) -> list[dict]:
    layer = r"^(model\.layers\.\d+\."
    return [
        {
            "op": "split",
            "pattern": layer + r"self_attn\.)qkv_proj\.weight$",
            "into": [r"\1q_proj.weight", r"\1k_proj.weight", r"\1v_proj.weight"],
            "sizes": [32, 16, 16],  # 4 query heads, 2 key/value heads of 8
        },
        {
            "op": "split",
            "pattern": layer + r"mlp\.)gate_up_proj\.weight$",
            "into": [rf"\1{part}_proj.weight" for part in gate_up],
        },
    ]


def test_a_right_llamafied_phi3_passes(run_cli, phi3: Path, tmp_path: Path):
    rules = _rules(
        tmp_path, phi3, _llamafy(["gate", "up"]),
        ("transformers:LlamaForCausalLM", LLAMA), ("transformers:Phi3ForCausalLM", PHI3),
    )  # fmt: skip
    proc = run_cli("apply", rules, "--json")
    assert proc.returncode == 0, proc.stderr
    verify = json.loads(proc.stdout)["verify"]
    assert verify["ok"] and verify["warnings"] == []


def test_gate_and_up_split_in_the_wrong_order_is_named_at_the_mlp(
    run_cli, phi3: Path, tmp_path: Path
):
    rules = _rules(
        tmp_path, phi3, _llamafy(["up", "gate"]),
        ("transformers:LlamaForCausalLM", LLAMA), ("transformers:Phi3ForCausalLM", PHI3),
    )  # fmt: skip
    first = _first_divergence(run_cli, rules)
    assert first["candidate"] == "model.layers.0.mlp"
    assert first["reference"] == "model.layers.0.mlp"
    assert first["max_abs_err"] > 1e-2


# -- Meta's Llama (interleaved rotary rows) -> transformers, grouped-query --------------

LLAMA_RULES = REPO / "rules" / "meta_llama_to_hf.yaml"


@pytest.fixture(scope="module")
def meta_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(REPO / "examples"))
    import make_checkpoints

    return make_checkpoints.meta_llama(tmp_path_factory.mktemp("llama"))


def _meta_rules(tmp_path: Path, source: Path, k_heads: int | None, length: int = 16) -> Path:
    """The bundled example with ``k_proj``'s permute_rope given ``k_heads`` (None: left out),
    paths made absolute."""
    doc = yaml.safe_load(LLAMA_RULES.read_text())
    rules = []
    for rule in doc["rules"]:
        if rule["op"] == "permute_rope" and "k_proj" in rule["pattern"]:
            if k_heads is None:
                continue
            rule["heads"] = k_heads
        rules.append(rule)
    doc["rules"] = rules
    doc["source"] = str(source)
    doc["output"] = str(tmp_path / "out.safetensors")
    for section in (doc["target"], doc["verify"]["reference"]):
        section["model"] = f"{REPO / 'examples' / 'meta_llama.py'}:{section['model'].split(':')[1]}"
    doc["verify"]["inputs"] = [{"shape": [2, length], "dtype": "int64", "high": 128}]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_k_proj_permuted_with_the_query_head_count_is_named_at_the_attention(
    run_cli, meta_llama: Path, tmp_path: Path
):
    """llama.cpp #2376: ``k_proj`` permuted with 4 heads where it has 2 (grouped-query)."""
    assert run_cli("apply", _meta_rules(tmp_path, meta_llama, 2)).returncode == 0
    (tmp_path / "out.safetensors").unlink()
    first = _first_divergence(run_cli, _meta_rules(tmp_path, meta_llama, 4))
    assert first["candidate"] == "model.layers.0.self_attn"
    assert first["reference"] == "layers.0.attention"
    # Both projections agree once carried through the plan's own permutation: the note
    # points at them as where a wrong head count would hide.
    assert "the plan moved the rows of k_proj (permuted), q_proj (permuted)" in first["note"]


def test_a_length_one_input_is_warned_about_when_it_hides_a_missing_permute(
    run_cli, meta_llama: Path, tmp_path: Path
):
    """At position 0 rotary embedding is the identity: without permute_rope the function is
    the same on length-1 inputs, so it passes, but the user is told why that proves little."""
    proc = run_cli("apply", _meta_rules(tmp_path, meta_llama, 2, length=1), "--json")
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "out.safetensors").unlink()
    proc = run_cli("apply", _meta_rules(tmp_path, meta_llama, None, length=1), "--json")
    assert proc.returncode == 0, proc.stderr  # the premise: the hole the warning is about
    warnings = json.loads(proc.stdout)["verify"]["warnings"]
    assert len(warnings) == 1 and "a sequence of length 1 attends only to itself" in warnings[0]
    assert "permute_rope's rows cannot show" in warnings[0]  # q_proj's is still in the plan
    assert f"warning: {warnings[0]}" in proc.stderr
    # At length 16 the same rules fail, at the first attention.
    (tmp_path / "out.safetensors").unlink()
    first = _first_divergence(run_cli, _meta_rules(tmp_path, meta_llama, None, length=16))
    assert first["candidate"] == "model.layers.0.self_attn"


# -- GPT-2 (Conv1D) -> nanoGPT (nn.Linear) -------------------------------------------------

GPT2 = {
    "vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 32,
    "activation_function": "gelu", "bos_token_id": 0, "eos_token_id": 0,
}  # fmt: skip
NANO = {"vocab_size": 64, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 32}
IDS = [{"shape": [2, 8], "dtype": "int64", "high": 64}]  # positional: nanoGPT calls it idx


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT-2 saved by transformers: Conv1D weights [in, out], the tied head left out."""
    folder = tmp_path_factory.mktemp("gpt2") / "gpt2"
    _trained_like(transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2))).save_pretrained(
        folder
    )
    return folder


def _to_nanogpt(transposed: str, split_qkv: bool = False, bias_order: str = "qkv") -> list[dict]:
    rules: list[dict] = [{"op": "transpose", "pattern": transposed}]
    if split_qkv:
        rules.append({
            "op": "split", "pattern": r"^(transformer\.h\.\d+\.attn\.)c_attn\.weight$",
            "into": [r"\1q.weight", r"\1k.weight", r"\1v.weight"],
        })  # fmt: skip
        rules.append({
            "op": "split", "pattern": r"^(transformer\.h\.\d+\.attn\.)c_attn\.bias$",
            "into": [rf"\1{part}.bias" for part in bias_order],
        })  # fmt: skip
    return rules


ALL_CONV1D = r"\.(c_attn|c_proj|c_fc)\.weight$"


@pytest.mark.parametrize("split_qkv", [False, True])
def test_gpt2_to_nanogpt_passes(run_cli, gpt2: Path, tmp_path: Path, split_qkv: bool):
    rules = _rules(
        tmp_path, gpt2, _to_nanogpt(ALL_CONV1D, split_qkv),
        (f"{NANOGPT}:GPT", {**NANO, "split_qkv": split_qkv}),
        ("transformers:GPT2LMHeadModel", GPT2), IDS,
    )  # fmt: skip
    proc = run_cli("apply", rules, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verify"]["ok"]


def test_the_square_c_proj_left_untransposed_is_named(run_cli, gpt2: Path, tmp_path: Path):
    rules = _rules(
        tmp_path, gpt2, _to_nanogpt(r"\.(c_attn|mlp\.c_proj|c_fc)\.weight$"),
        (f"{NANOGPT}:GPT", NANO), ("transformers:GPT2LMHeadModel", GPT2), IDS,
    )  # fmt: skip
    first = _first_divergence(run_cli, rules)
    assert first["candidate"] == "transformer.h.0.attn.c_proj"


def test_a_split_layer_is_compared_through_the_split_and_named(run_cli, gpt2: Path, tmp_path: Path):
    """The fused weight split right, its bias split in the wrong order: ``q`` is compared with
    the first third of the reference ``c_attn``'s output (carried through the split) and is
    the module named, though no reference module is called ``q``."""
    rules = _rules(
        tmp_path, gpt2, _to_nanogpt(ALL_CONV1D, split_qkv=True, bias_order="kqv"),
        (f"{NANOGPT}:GPT", {**NANO, "split_qkv": True}), ("transformers:GPT2LMHeadModel", GPT2),
        IDS,
    )  # fmt: skip
    first = _first_divergence(run_cli, rules)
    assert first["candidate"] == "transformer.h.0.attn.q"
    assert first["reference"] == "transformer.h.0.attn.c_attn"
    assert "carried through the plan's split" in first["note"]


# -- inputs that cannot show a change ---------------------------------------------------


def test_identical_samples_and_unreached_embedding_rows_are_warned_about(
    run_cli, gpt2: Path, tmp_path: Path
):
    inputs = [{"shape": [3, 8], "dtype": "int64", "high": 1}]
    rules = _rules(
        tmp_path, gpt2, _to_nanogpt(ALL_CONV1D), (f"{NANOGPT}:GPT", NANO),
        ("transformers:GPT2LMHeadModel", GPT2), inputs=inputs,
    )  # fmt: skip
    proc = run_cli("apply", rules, "--json")
    assert proc.returncode == 0, proc.stderr
    warnings = json.loads(proc.stdout)["verify"]["warnings"]
    assert any("the 3 samples of the batch are all the same" in w for w in warnings), warnings
    assert any("reach 1 of the 64 rows of transformer.wte" in w for w in warnings), warnings
    assert proc.stderr.count("warning: inputs[0]:") == 2


# -- the correspondence, derived from the plan (unit level) ------------------------------


class Fused(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(4, 12)


class Parts(torch.nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(width, 4) for _ in range(3))


def _pairing(reference: torch.nn.Module, candidate: torch.nn.Module, rules: list[dict]):
    from ckptsurgeon.engine.rewrite import run_rules
    from ckptsurgeon.engine.verify import match_modules
    from ckptsurgeon.formats.table import from_tensor
    from ckptsurgeon.rules.document import parse_rules

    source = {n: from_tensor(t, n) for n, t in reference.state_dict().items()}
    plan, _ = run_rules(parse_rules({"rules": rules}), source, None)
    return match_modules(reference, candidate, plan, source)


def test_a_split_carries_each_part_from_its_rows_of_the_fused_output():
    pairing = _pairing(Fused(), Parts(), [
        {"op": "split", "pattern": r"^qkv\.(weight|bias)$", "into": [r"q.\1", r"k.\1", r"v.\1"]},
    ])  # fmt: skip
    assert pairing.carried["k"].modules == ("qkv",)
    assert pairing.carried["k"].index.tolist() == [4, 5, 6, 7]
    out = torch.randn(2, 3, 12)
    assert torch.equal(pairing.carried["v"].apply([out]), out[..., 8:])


def test_a_merge_carries_the_fused_output_from_each_part():
    pairing = _pairing(Parts(), Fused(), [
        {"op": "merge", "pattern": r"^([qkv])\.(weight|bias)$", "order": ["q", "k", "v"],
         "into": r"qkv.\2"},
    ])  # fmt: skip
    carry = pairing.carried["qkv"]
    assert carry.modules == ("q", "k", "v") and carry.index.tolist() == list(range(12))


def test_permute_rope_carries_the_rows_as_transformers_permutes_them():
    heads, rows = 2, 8
    reference, candidate = torch.nn.Linear(4, rows), torch.nn.Linear(4, rows)
    pairing = _pairing(reference, candidate, [
        {"op": "permute_rope", "pattern": "^weight$", "heads": heads},
        {"op": "permute_rope", "pattern": "^bias$", "heads": heads},
    ])  # fmt: skip
    index = pairing.carried[""].index
    half = rows // heads // 2
    # Interleaved pairs (2i, 2i+1) of each head become rows i and i + half.
    expected = torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(rows)
    assert torch.equal(index, expected)


def test_a_split_along_the_input_dim_is_reported_as_not_compared():
    """Columns split apart: each part computes a partial sum, no reference output feature."""

    class Halves(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 12, bias=False), torch.nn.Linear(2, 12, bias=False)

    pairing = _pairing(Fused(), Halves(), [
        {"op": "drop", "pattern": r"^qkv\.bias$"},
        {"op": "split", "pattern": r"^qkv\.weight$", "into": ["a.weight", "b.weight"], "dim": 1},
    ])  # fmt: skip
    assert not pairing.carried
    assert "output features, not whole ones" in pairing.not_compared["a"]


def test_default_inputs_of_diff_suggest_verify_raise_no_warning():
    from ckptsurgeon.engine.verify import input_warnings, make_inputs
    from ckptsurgeon.rules.verify import VerifySpec
    from ckptsurgeon.suggest.verify import guess_inputs

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    spec = VerifySpec.model_validate({"reference": {"model": "x:y"}, "inputs": guess_inputs(model)})
    args, _ = make_inputs(spec, 0, ".", torch.device("cpu"))
    assert args[0].shape[1] > 1
    assert input_warnings({"inputs[0]": args[0]}, {}, model, {"inputs[0]": 64}) == []
