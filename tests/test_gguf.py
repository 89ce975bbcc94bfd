"""GGUF files, read and dequantized, checked against llama.cpp's gguf package and against
transformers' own GGUF loading.

The files are written here with ``gguf.GGUFWriter`` from a tiny seeded transformers Llama,
laid out as llama.cpp's convert_hf_to_gguf.py lays one out: GGUF names, the rows of q/k
permuted into the interleaved rotary order, dimensions reversed, the ``llama.*`` metadata
transformers reads its config from. F32/F16/BF16/Q8_0/Q4_0 come from ``gguf.quants``;
gguf-py cannot quantise Q4_K or Q6_K, so those blocks are encoded below from their layout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, assert_clean_failure
from gguf import GGMLQuantizationType as Q
from transformers import LlamaConfig, LlamaForCausalLM

from ckptsurgeon import api
from ckptsurgeon.cli import cli
from ckptsurgeon.errors import InputError
from ckptsurgeon.formats import gguf_io
from ckptsurgeon.formats.checkpoint import detect_format
from ckptsurgeon.formats.reader import open_checkpoint

RULES = REPO / "rules" / "gguf_llama_to_hf.yaml"
# The rules file's target (hidden 256: K-quant rows are 256-element super-blocks).
CONFIG = dict(
    vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
)  # fmt: skip
KINDS = ("f32", "f16", "bf16", "q8_0", "q4_0", "k_quants")
# What the 2-D weights are stored as, per file (1-D norms stay F32, as llama.cpp keeps them);
# k_quants mixes Q6_K (embedding, head, ffn_down) and Q4_K (the rest), as Q4_K_M does.
WEIGHT_TYPE = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
TOKENS = torch.arange(2 * 16).reshape(2, 16) * 37 % CONFIG["vocab_size"]


@pytest.fixture(scope="session")
def hf_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="session")
def gguf_files(hf_model, tmp_path_factory) -> dict[str, Path]:
    """One GGUF file per kind, each alone in its folder (transformers loads it from there)."""
    root = tmp_path_factory.mktemp("gguf")
    files = {}
    for kind in KINDS:
        (root / kind).mkdir()
        files[kind] = root / kind / f"tiny-{kind}.gguf"
        _write_gguf(files[kind], hf_model, kind)
    return files


# --- writing GGUF as llama.cpp's converter does -----------------------------------------


def _interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' half-split rotary rows -> llama.cpp's interleaved ones: each head's rows
    (first halves, then second halves) become pairs of adjacent rows."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """The model's weights under GGUF names, q/k rows interleaved, in the model's order."""
    cfg = model.config
    layer = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }  # fmt: skip
    out = {}
    for name, tensor in model.state_dict().items():
        w = tensor.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "model.norm.weight":
            out["output_norm.weight"] = w
        elif name == "lm_head.weight":
            out["output.weight"] = w
        else:
            parts = name.split(".")  # model.layers.N.<module...>.weight
            n, module = parts[2], ".".join(parts[3:-1])
            if module == "self_attn.q_proj":
                w = _interleave(w, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                w = _interleave(w, cfg.num_key_value_heads)
            out[f"blk.{n}.{layer[module]}.weight"] = w
    return out


def _weight_type(kind: str, name: str) -> Q:
    if kind == "k_quants":
        return Q.Q6_K if name.split(".")[-2] in ("token_embd", "output", "ffn_down") else Q.Q4_K
    return WEIGHT_TYPE[kind]


def _encode(w: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16)
    if qtype == Q.Q4_K:
        return _q4_k(w)
    if qtype == Q.Q6_K:
        return _q6_k(w)
    return gguf.quants.quantize(w, qtype)


def _write_gguf(path: Path, model: LlamaForCausalLM, kind: str) -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(CONFIG["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    for name, w in _gguf_tensors(model).items():
        qtype = Q.F32 if w.ndim == 1 else _weight_type(kind, name)
        writer.add_tensor(name, _encode(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Q4_K and Q6_K, encoded from the block layouts gguf.quants decodes (256-element
# super-blocks). Not llama.cpp's optimising search: plain min/max scales, enough for a
# quantised model that still computes roughly what the float one does.


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _q4_k(w: np.ndarray) -> np.ndarray:
    """Q4_K blocks (144 bytes): d, dmin (f16), 12 bytes of 6-bit scales and mins for eight
    32-element sub-blocks, 128 bytes of 4-bit values; x = d * sc * q - dmin * m."""
    x = w.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(x.min(-1), 0)
    scale = (x.max(-1) - lo) / 15
    d = _f16(scale.max(-1, keepdims=True) / 63)
    dmin = _f16(-lo.min(-1, keepdims=True) / 63)
    sc = np.clip(np.round(scale / np.where(d == 0, 1, d)), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-lo / np.where(dmin == 0, 1, dmin)), 0, 63).astype(np.uint8)
    step = (d * sc)[..., None]
    q = np.clip(np.round((x + (dmin * m)[..., None]) / step), 0, 15).astype(np.uint8)
    scales = np.concatenate(
        [
            (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6),
            (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4),
        ],
        axis=1,
    )
    q = q.reshape(-1, 4, 2, 32)  # sub-blocks 2c and 2c+1 share bytes: low, high nibble
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate(
        [d.astype(np.float16).view(np.uint8), dmin.astype(np.float16).view(np.uint8), scales, qs],
        axis=1,
    )
    return blocks.reshape(w.shape[0], -1)


def _q6_k(w: np.ndarray) -> np.ndarray:
    """Q6_K blocks (210 bytes): 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales
    for 16-element sub-blocks, d (f16); x = d * scale * (q - 32)."""
    x = w.reshape(-1, 16, 16).astype(np.float32)
    scale = np.abs(x).max(-1) / 31
    d = _f16(scale.max(-1, keepdims=True) / 127)
    sc = np.clip(np.round(scale / np.where(d == 0, 1, d)), 1, 127).astype(np.int8)
    step = (d * sc)[..., None]
    q = (np.clip(np.round(x / step), -32, 31) + 32).astype(np.uint8).reshape(-1, 256)
    low = (q & 0x0F).reshape(-1, 2, 2, 64)
    high = (q >> 4).reshape(-1, 2, 4, 32)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    qh = sum(high[:, :, t] << (2 * t) for t in range(4)).astype(np.uint8).reshape(-1, 64)
    blocks = np.concatenate(
        [ql, qh, sc.view(np.uint8), d.astype(np.float16).view(np.uint8)], axis=1
    )
    return blocks.reshape(w.shape[0], -1)


def test_k_quant_blocks_decode_to_the_weights():
    """The encoders above are right: gguf's own decoder gives back the weights, within the
    format's precision, and every block scale is finite."""
    w = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 512, generator=w) * 0.02).numpy()
    for qtype, encode, tol in ((Q.Q4_K, _q4_k, 0.1), (Q.Q6_K, _q6_k, 0.03)):
        blocks = encode(x)
        back = gguf.quants.dequantize(blocks, qtype)
        assert back.shape == x.shape and np.isfinite(back).all()
        err = np.abs(back - x).max() / np.abs(x).max()
        assert 0 < err < tol, (qtype.name, err)


# --- reading -----------------------------------------------------------------------------


def _expected_dtype(qtype: Q) -> torch.dtype:
    return {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}.get(
        qtype, torch.float32
    )


@pytest.mark.parametrize("kind", KINDS)
def test_tensors_are_ggufs_own_dequantization(gguf_files, hf_model, kind):
    path = gguf_files[kind]
    assert detect_format(str(path)) == "gguf"
    ckpt = open_checkpoint(path)
    reader = gguf.GGUFReader(path)
    assert ckpt.format == "gguf"
    assert list(ckpt.tensors) == [t.name for t in reader.tensors]
    assert ckpt.tensors["blk.0.attn_q.weight"].shape == (256, 256)
    assert ckpt.tensors["blk.1.attn_k.weight"].shape == (128, 256)  # 2 KV heads
    assert ckpt.tensors["blk.0.ffn_down.weight"].shape == (256, 512)  # torch order
    originals = _gguf_tensors(hf_model)
    for t in reader.tensors:
        ref = ckpt.tensors[t.name]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        assert ref.shape == shape and ref.dtype == _expected_dtype(t.tensor_type), t.name
        got = ref.load()
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        assert torch.equal(got.float(), torch.from_numpy(np.array(want))), t.name
        # ...and that is the weight llama.cpp's converter stored, to the format's precision.
        assert np.allclose(want, originals[t.name], atol=0.25 * np.abs(originals[t.name]).max())
    types = {t.tensor_type.name for t in reader.tensors}
    assert set(ckpt.quantization) == types and sum(ckpt.quantization.values()) == 2 + 9 * 2 + 1
    assert ckpt.metadata["general.architecture"] == "llama"
    assert ckpt.metadata["llama.attention.head_count_kv"] == "2"


def test_each_loader_reads_only_its_own_tensor(gguf_files, monkeypatch):
    path = gguf_files["k_quants"]
    reads = []
    real = gguf_io.read_span
    monkeypatch.setattr(gguf_io, "read_span", lambda span: reads.append(span) or real(span))
    ckpt = open_checkpoint(path)
    assert reads == []  # opening reads no tensor data
    ref = ckpt.tensors["blk.1.ffn_up.weight"]
    ref.load()
    (tensor,) = [t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.ffn_up.weight"]
    assert [(s.offset, s.length) for s in reads] == [(tensor.data_offset, tensor.n_bytes)]
    # Unquantised tensors keep their bytes' place, so writers copy them straight from disk.
    norm = ckpt.tensors["output_norm.weight"]
    assert norm.span is not None and norm.span.length == 256 * 4


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_rules_give_transformers_own_gguf_weights(gguf_files, tmp_path, kind):
    """Names and q/k rows as transformers' own GGUF loader (``gguf_file=``) produces them."""
    path = gguf_files[kind]
    theirs = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name).state_dict()
    api.apply(RULES, source=str(path), output=str(tmp_path / "out"))
    ours = open_checkpoint(tmp_path / "out").tensors
    assert sorted(ours) == sorted(theirs)
    for name, ref in ours.items():
        assert torch.equal(ref.load().float(), theirs[name]), name


def _logits(model: LlamaForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.float()


def test_apply_cli_f32_computes_the_original_logits(gguf_files, hf_model, tmp_path, run_cli):
    out = tmp_path / "llama_hf"
    proc = run_cli("apply", RULES, "--source", gguf_files["f32"], "--output", out, "-q")
    assert proc.returncode == 0, proc.stderr
    loaded = LlamaForCausalLM.from_pretrained(out).eval()
    assert torch.allclose(_logits(loaded), _logits(hf_model), atol=1e-5, rtol=0)


# Relative error of the logits, by the precision of the file's weights.
LOOSE = {"f16": 0.01, "bf16": 0.03, "q8_0": 0.05, "q4_0": 0.3, "k_quants": 0.3}


@pytest.mark.parametrize("kind", sorted(LOOSE))
def test_apply_quantised_computes_roughly_the_original(gguf_files, hf_model, tmp_path, kind):
    out = tmp_path / "llama_hf"
    api.apply(RULES, source=str(gguf_files[kind]), output=str(out))
    got, want = _logits(LlamaForCausalLM.from_pretrained(out).eval()), _logits(hf_model)
    rel = ((got - want).norm() / want.norm()).item()
    assert 0 < rel < LOOSE[kind], rel  # 0 would mean the file was not quantised at all


def test_rope_permutation_is_needed(gguf_files, hf_model, tmp_path):
    """Without permute_rope the result still loads and computes something else: the rules
    file's permutation is what makes the logits match."""
    doc = __import__("yaml").safe_load(RULES.read_text())
    doc["rules"] = [r for r in doc["rules"] if r["op"] != "permute_rope"]
    doc["source"], doc["output"] = str(gguf_files["f32"]), str(tmp_path / "out")
    api.apply(doc)
    got = _logits(LlamaForCausalLM.from_pretrained(tmp_path / "out").eval())
    assert not torch.allclose(got, _logits(hf_model), atol=1e-2)


def test_inspect_shows_architecture_and_quantisation(gguf_files):
    path = gguf_files["k_quants"]
    proc = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert proc.exit_code == 0, proc.output
    summary = json.loads(proc.stdout)
    assert summary["format"] == "gguf" and summary["architecture"] == "llama"
    assert summary["quantization"] == {"Q6_K": 4, "Q4_K": 12, "F32": 5}
    assert summary["tensors"]["blk.0.attn_q.weight"] == {
        "shape": [256, 256], "dtype": "float32", "bytes": 256 * 256 * 4
    }  # fmt: skip
    assert summary["metadata"]["llama.attention.head_count"] == "4"
    text = CliRunner().invoke(cli, ["inspect", str(path)])
    assert text.exit_code == 0, text.output
    assert "architecture: llama; stored as Q6_K x4, Q4_K x12, F32 x5" in text.stdout


# --- bad input ----------------------------------------------------------------------------


def _bad_copy(src: Path, dst: Path, fix) -> Path:
    data = bytearray(src.read_bytes())
    dst.write_bytes(bytes(fix(data)))
    return dst


def _retyped(data: bytearray, name: bytes, qtype: int) -> bytearray:
    """``data`` with tensor ``name``'s type field (after its name, dims) set to ``qtype``."""
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    at += 4 + 8 * n_dims
    data[at : at + 4] = qtype.to_bytes(4, "little")
    return data


BAD = {
    "truncated": (lambda d: d[: len(d) * 2 // 3], "corrupt or truncated GGUF file"),
    "cut_in_header": (lambda d: d[:200], "corrupt or truncated GGUF file"),
    "bad_magic": (lambda d: bytearray(b"GGUX") + d[4:], "bad magic"),
    "garbage_counts": (lambda d: d[:8] + bytearray(b"\xff" * 16) + d[24:], "corrupt or truncated"),
    # A type number GGUF does not define: gguf's reader refuses it while parsing.
    "unknown_type": (
        lambda d: _retyped(d, b"blk.0.ffn_up.weight", 99),
        "not a valid GGMLQuantizationType",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_gguf_is_exit_3_and_writes_nothing(gguf_files, tmp_path, case):
    fix, needle = BAD[case]
    bad = _bad_copy(gguf_files["q8_0"], tmp_path / "bad.gguf", fix)
    before = bad.read_bytes()
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["apply", str(RULES), "--source", str(bad), "--output", str(out), "-q"]
    )
    assert result.exit_code == 3, (result.output, result.exception)
    message = result.stderr.strip()
    assert str(bad) in message and needle in message, message
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert sorted(tmp_path.iterdir()) == [bad] and bad.read_bytes() == before


def test_type_gguf_cannot_dequantize_names_the_tensor(tmp_path):
    """A tensor stored as Q8_K (a type gguf knows, without a dequantizer) is exit 3 naming
    the file and the tensor, before anything is read or written."""
    path = tmp_path / "q8k.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("ok.weight", np.ones((2, 32), dtype=np.float32))
    _, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_K]
    writer.add_tensor("odd.weight", np.zeros((2, type_size), np.uint8), raw_dtype=Q.Q8_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputError) as err:
        open_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "'odd.weight'" in message and "Q8_K" in message
    assert err.value.exit_code == 3


def test_without_gguf_installed_says_how_to_install(gguf_files, run_cli):
    probe = (
        "import sys; sys.modules['gguf'] = None\n"  # as if not installed: import fails
        "from ckptsurgeon.cli import main; sys.argv[1:] = ['inspect', sys.argv[1]]; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(gguf_files["f32"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_clean_failure(proc, 3, str(gguf_files["f32"]), 'pip install "ckptsurgeon[gguf]"')
