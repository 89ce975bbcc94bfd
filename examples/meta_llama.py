"""A small, readable re-implementation of Meta's original Llama architecture.

This follows ``model.py`` from facebookresearch/llama (the reference code published
with Llama 2, and kept the same for Llama 3), minus the KV cache and fairscale's
model-parallel layers: plain ``nn.Linear`` without bias everywhere. The parameter
names are Meta's, so a state dict from this module looks like a ``consolidated.*.pth``
checkpoint::

    tok_embeddings.weight
    layers.N.attention.{wq,wk,wv,wo}.weight
    layers.N.feed_forward.{w1,w2,w3}.weight
    layers.N.attention_norm.weight
    layers.N.ffn_norm.weight
    norm.weight
    output.weight

Why the layout matters: Meta applies rotary embeddings in the *interleaved* layout.
``apply_rotary_emb`` views each head's features as complex numbers made of ADJACENT
pairs ``(x0, x1), (x2, x3), ...`` (``torch.view_as_complex``) and rotates each pair.
So the output rows of ``wq`` and ``wk`` are, per head, in interleaved rotary order.
transformers' ``LlamaForCausalLM`` instead rotates with ``rotate_half``, pairing
feature ``i`` with feature ``i + head_dim // 2`` (the *half-split* layout). Copying
``wq``/``wk`` across unchanged gives a model that loads without complaint but computes
something else; a conversion must permute their rows, per head, from interleaved to
half-split order (``transformers.core_model_loading.PermuteForRope``; for ``wk`` the
head count is ``n_kv_heads``). All other weights carry over by renaming alone.

``llama_config`` gives the equivalent ``transformers.LlamaConfig`` and ``hf_llama``
builds the matching ``LlamaForCausalLM``, so both models can be named as targets with
the same keyword arguments, e.g. ``examples/meta_llama.py:MetaTransformer`` and
``examples/meta_llama.py:hf_llama``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MetaArgs", "MetaTransformer", "hf_llama", "llama_config"]


@dataclass
class MetaArgs:
    """Model hyper-parameters, named as in Meta's ``ModelArgs`` (small defaults)."""

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    vocab_size: int = 128
    hidden_dim: int = 96
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 64


def _args(args: MetaArgs | None, kwargs: dict) -> MetaArgs:
    """``args`` (or the defaults) with ``kwargs`` overriding its fields."""
    return replace(args if args is not None else MetaArgs(), **kwargs)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x.float()).type_as(x) * self.weight


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """Complex rotations ``exp(i * t * f_k)``, shape ``(end, dim // 2)``."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, head_dim // 2) complex; freqs_cis: (T, head_dim // 2)
    shape = [d if i in (1, x.ndim - 1) else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def apply_rotary_emb(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ADJACENT feature pairs ``(2j, 2j + 1)``: the interleaved layout."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = reshape_for_broadcast(freqs_cis, xq_)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(B, T, n_kv_heads, D)`` -> ``(B, T, n_kv_heads * n_rep, D)``."""
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (
        x[:, :, :, None, :]
        .expand(bs, slen, n_kv_heads, n_rep, head_dim)
        .reshape(bs, slen, n_kv_heads * n_rep, head_dim)
    )


class Attention(nn.Module):
    def __init__(self, args: MetaArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(
        self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)

        keys = repeat_kv(xk, self.n_rep)
        values = repeat_kv(xv, self.n_rep)

        xq, keys, values = (t.transpose(1, 2) for t in (xq, keys, values))  # (B, H, T, D)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        output = torch.matmul(scores, values)  # (B, H, T, D)
        output = output.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.wo(output)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1(x)) * w3(x))``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: MetaArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class MetaTransformer(nn.Module):
    """Meta's ``Transformer``; keyword arguments override fields of ``args``."""

    def __init__(self, args: MetaArgs | None = None, **kwargs):
        super().__init__()
        args = _args(args, kwargs)
        if args.dim % args.n_heads or args.n_heads % args.n_kv_heads:
            raise ValueError("dim must divide by n_heads, and n_heads by n_kv_heads")
        self.params = args
        self.vocab_size = args.vocab_size
        self.n_layers = args.n_layers

        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

        # Not a buffer: Meta's checkpoints carry no rotary tables, and neither does this.
        self.freqs_cis = precompute_freqs_cis(
            args.dim // args.n_heads, args.max_seq_len * 2, args.rope_theta
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (B, T) -> logits (B, T, vocab_size), as float32."""
        _bsz, seqlen = tokens.shape
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[:seqlen].to(h.device)

        mask = None
        if seqlen > 1:
            mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device)
            mask = torch.triu(mask, diagonal=1).type_as(h)

        for layer in self.layers:
            h = layer(h, freqs_cis, mask)
        h = self.norm(h)
        return self.output(h).float()


def llama_config(args: MetaArgs | None = None, **kwargs):
    """The ``transformers.LlamaConfig`` of the same model as ``MetaTransformer(args, **kwargs)``."""
    from transformers import LlamaConfig

    args = _args(args, kwargs)
    fields = dict(
        hidden_size=args.dim,
        intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        head_dim=args.dim // args.n_heads,
        vocab_size=args.vocab_size,
        rms_norm_eps=args.norm_eps,
        max_position_embeddings=args.max_seq_len,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    # transformers 5 takes ``rope_parameters``; 4.x takes a top-level ``rope_theta``.
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": args.rope_theta}
    else:
        fields["rope_theta"] = args.rope_theta
    config = LlamaConfig(**fields)
    # Eager attention: the same matmul-softmax-matmul as MetaTransformer, for exact comparisons.
    config._attn_implementation = "eager"
    return config


def hf_llama(args: MetaArgs | None = None, **kwargs):
    """A ``transformers.LlamaForCausalLM`` built from ``llama_config(args, **kwargs)``."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config(args, **kwargs))
