"""examples/meta_llama.py: Meta's interleaved-rotary Llama equals transformers' Llama
once wq/wk are permuted, and differs clearly when they are not."""

from __future__ import annotations

import copy
import sys

import torch
from conftest import REPO
from transformers.core_model_loading import PermuteForRope

sys.path.insert(0, str(REPO / "examples"))

import meta_llama

ARGS = meta_llama.MetaArgs()  # dim 64, 2 layers, 4 heads, 2 kv heads (GQA), vocab 128


def _meta_model() -> meta_llama.MetaTransformer:
    torch.manual_seed(0)
    model = meta_llama.MetaTransformer(ARGS)
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.eval()


def _permute(tensor: torch.Tensor, config, n_heads: int) -> torch.Tensor:
    config = copy.deepcopy(config)
    config.num_attention_heads = n_heads
    return PermuteForRope()._permute_for_rope(tensor, config)


def _to_hf(state: dict[str, torch.Tensor], config, permute: bool) -> dict[str, torch.Tensor]:
    """Meta names -> transformers names, by hand; wq/wk rows permuted if ``permute``."""
    out = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["output.weight"],
    }
    for n in range(ARGS.n_layers):
        src, dst = f"layers.{n}.", f"model.layers.{n}."
        wq = state[src + "attention.wq.weight"]
        wk = state[src + "attention.wk.weight"]
        if permute:
            wq = _permute(wq, config, ARGS.n_heads)
            wk = _permute(wk, config, ARGS.n_kv_heads)
        out[dst + "self_attn.q_proj.weight"] = wq
        out[dst + "self_attn.k_proj.weight"] = wk
        out[dst + "self_attn.v_proj.weight"] = state[src + "attention.wv.weight"]
        out[dst + "self_attn.o_proj.weight"] = state[src + "attention.wo.weight"]
        out[dst + "mlp.gate_proj.weight"] = state[src + "feed_forward.w1.weight"]
        out[dst + "mlp.up_proj.weight"] = state[src + "feed_forward.w3.weight"]
        out[dst + "mlp.down_proj.weight"] = state[src + "feed_forward.w2.weight"]
        out[dst + "input_layernorm.weight"] = state[src + "attention_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "ffn_norm.weight"]
    assert len(out) == len(state)
    return out


def _hf_logits(state: dict[str, torch.Tensor], tokens: torch.Tensor, permute: bool):
    hf = meta_llama.hf_llama()
    hf.load_state_dict(_to_hf(state, hf.config, permute), strict=True)
    hf.eval()
    with torch.no_grad():
        return hf(input_ids=tokens).logits


def test_state_dict_names_are_metas():
    names = set(_meta_model().state_dict())
    assert "tok_embeddings.weight" in names and "output.weight" in names
    assert "layers.1.attention.wk.weight" in names
    assert "layers.1.feed_forward.w3.weight" in names
    assert "layers.1.ffn_norm.weight" in names
    assert not any("freqs" in name for name in names)


def test_llama_config_matches_args():
    config = meta_llama.llama_config(n_layers=3, rope_theta=500000.0)
    assert config.num_hidden_layers == 3
    assert config.hidden_size == ARGS.dim and config.intermediate_size == ARGS.hidden_dim
    assert config.num_key_value_heads == ARGS.n_kv_heads
    assert config.head_dim == ARGS.dim // ARGS.n_heads
    theta = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    assert theta["rope_theta"] == 500000.0
    assert config.tie_word_embeddings is False


def test_permuted_conversion_matches_and_unpermuted_does_not():
    model = _meta_model()
    torch.manual_seed(1)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(tokens)
    state = model.state_dict()

    converted = _hf_logits(state, tokens, permute=True)
    diff = (converted - ref).abs().max().item()
    print(f"max abs diff, permuted: {diff:.3e}")
    assert diff < 1e-5, diff

    naive = _hf_logits(state, tokens, permute=False)
    naive_diff = (naive - ref).abs().max().item()
    print(f"max abs diff, not permuted: {naive_diff:.3e}")
    assert naive_diff > 1e-2, naive_diff
