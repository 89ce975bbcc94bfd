"""`permute_rope`: the same permutation as transformers' PermuteForRope, in both directions,
on its own and through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_clean_failure, materialise
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig
from transformers.core_model_loading import PermuteForRope

from ckptsurgeon.engine.plan import run_rules
from ckptsurgeon.errors import FitError, RulesError
from ckptsurgeon.formats.table import from_tensor
from ckptsurgeon.rules.document import parse_rules

HIDDEN, HEADS, KV_HEADS = 64, 8, 2
HEAD_DIM = HIDDEN // HEADS


def reference(tensor: torch.Tensor, heads: int, inverse: bool = False) -> torch.Tensor:
    """transformers' own permutation, with a real config whose head count is ``heads``."""
    config = LlamaConfig(
        hidden_size=HIDDEN,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=HEAD_DIM,
    )
    return PermuteForRope(inverse=inverse)._permute_for_rope(tensor.clone(), config)


def permute(tensors: dict[str, torch.Tensor], rules: list[dict]) -> dict[str, torch.Tensor]:
    table = {name: from_tensor(t, name) for name, t in tensors.items()}
    out, _ = run_rules(parse_rules({"rules": rules}), table, None)
    return materialise(out)


def attention(seed: int = 0) -> dict[str, torch.Tensor]:
    """A grouped-query layer: q has HEADS heads, k has KV_HEADS."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "layers.0.q_proj.weight": torch.randn(HEADS * HEAD_DIM, HIDDEN, generator=gen),
        "layers.0.q_proj.bias": torch.randn(HEADS * HEAD_DIM, generator=gen),
        "layers.0.k_proj.weight": torch.randn(KV_HEADS * HEAD_DIM, HIDDEN, generator=gen),
        "layers.0.k_proj.bias": torch.randn(KV_HEADS * HEAD_DIM, generator=gen),
    }


def rope_rules(inverse: bool = False) -> list[dict]:
    return [
        {"op": "permute_rope", "pattern": r"q_proj\.", "heads": HEADS, "inverse": inverse},
        {"op": "permute_rope", "pattern": r"k_proj\.", "heads": KV_HEADS, "inverse": inverse},
    ]


def rope_rule(**fields: object) -> dict:
    return {"op": "permute_rope", "pattern": "q", **fields}


@pytest.mark.parametrize("inverse", [False, True])
def test_matches_transformers_permute_for_rope_mha_and_gqa(inverse: bool) -> None:
    src = attention()
    out = permute(src, rope_rules(inverse))
    for name, tensor in src.items():
        heads = HEADS if "q_proj" in name else KV_HEADS
        expected = reference(tensor, heads, inverse)
        assert out[name].shape == tensor.shape and out[name].dtype == tensor.dtype
        assert torch.equal(out[name], expected), name
        assert not torch.equal(out[name], tensor), name  # it really moved rows


def test_forward_then_inverse_is_bit_identical() -> None:
    src = {name: t.bfloat16() for name, t in attention(seed=1).items()}
    there = permute(src, rope_rules())
    back = permute(there, rope_rules(inverse=True))
    for name, tensor in src.items():
        assert back[name].dtype == torch.bfloat16
        assert torch.equal(back[name], tensor), name


def test_forward_rotates_pairs_into_halves() -> None:
    # One head of 4 rows [a0, b0, a1, b1] (interleaved pairs) -> [a0, a1, b0, b1].
    out = permute({"q.bias": torch.tensor([0.0, 1.0, 2.0, 3.0])}, [rope_rule(heads=1)])
    assert out["q.bias"].tolist() == [0.0, 2.0, 1.0, 3.0]


def test_bad_shapes_fail_at_planning_naming_the_key() -> None:
    rows = {"q.weight": from_tensor(torch.ones(12, 4), "q.weight")}
    with pytest.raises(FitError, match=r"'q\.weight' \[12, 4\] has 12 rows, not divisible by"):
        run_rules(parse_rules({"rules": [rope_rule(heads=4)]}), rows, None)
    conv = {"q.weight": from_tensor(torch.ones(8, 2, 2), "q.weight")}
    with pytest.raises(FitError, match=r"'q\.weight' \[8, 2, 2\] is neither a 2-D weight"):
        run_rules(parse_rules({"rules": [rope_rule(heads=2)]}), conv, None)


@pytest.mark.parametrize("heads", [0, -2, "eight"])
def test_heads_must_be_a_positive_int(heads: object) -> None:
    with pytest.raises(RulesError, match="heads"):
        parse_rules([rope_rule(heads=heads)])


RULES = """\
version: 1
source: src.safetensors
output: out.safetensors
rules:
  - op: permute_rope
    pattern: 'q_proj\\.'
    heads: {q_heads}
  - op: permute_rope
    pattern: 'k_proj\\.'
    heads: {k_heads}
"""


def write_project(tmp_path: Path, q_heads: object, k_heads: object) -> dict[str, torch.Tensor]:
    src = attention(seed=2)
    save_file(src, str(tmp_path / "src.safetensors"))
    (tmp_path / "rules.yaml").write_text(RULES.format(q_heads=q_heads, k_heads=k_heads))
    return src


def test_cli_apply_writes_permuted_tensors(tmp_path: Path, run_cli) -> None:
    src = write_project(tmp_path, HEADS, KV_HEADS)
    proc = run_cli("apply", tmp_path / "rules.yaml", "--report", tmp_path / "report.json")
    assert proc.returncode == 0, proc.stderr
    written = load_file(str(tmp_path / "out.safetensors"))
    assert sorted(written) == sorted(src)
    for name, tensor in src.items():
        heads = HEADS if "q_proj" in name else KV_HEADS
        assert torch.equal(written[name], reference(tensor, heads)), name
    assert '"permuted": 4' in (tmp_path / "report.json").read_text()


def test_cli_rows_not_divisible_is_exit_1_naming_the_key(tmp_path: Path, run_cli) -> None:
    write_project(tmp_path, HEADS, 3)  # 16 k rows are not divisible by 2 * 3
    proc = run_cli("apply", tmp_path / "rules.yaml")
    assert_clean_failure(
        proc, 1, "rules[1] (permute_rope)", "'layers.0.k_proj.", "not divisible by 2 * heads = 6"
    )
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_zero_heads_is_exit_2(tmp_path: Path, run_cli) -> None:
    write_project(tmp_path, 0, KV_HEADS)
    proc = run_cli("apply", tmp_path / "rules.yaml")
    assert_clean_failure(proc, 2, "heads")
    assert not (tmp_path / "out.safetensors").exists()
