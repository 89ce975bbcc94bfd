"""Fresh values from a model target: made the way the model initialises them, at planning
time (so a dry run fails where the real run would), and never left uninitialised."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import materialise
from safetensors.torch import load_file, save_file
from torch import nn

from ckptsurgeon.api import apply as apply_file
from ckptsurgeon.engine.plan import run_rules
from ckptsurgeon.errors import FitError
from ckptsurgeon.formats.table import from_tensor
from ckptsurgeon.rules.document import parse_rules
from ckptsurgeon.targets.models import build_model
from ckptsurgeon.targets.seeds import derive_seed
from ckptsurgeon.targets.spec import TargetInfo, expected_from_model

VIT = "torchvision.models.vision_transformer:VisionTransformer"
VIT_KW = dict(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64)


def write_rules(folder: Path, target: dict[str, Any], rules: list[dict], seed: int = 0) -> Path:
    doc = {
        "version": 1,
        "source": "source.safetensors",
        "target": target,
        "output": "out.safetensors",
        "seed": seed,
        "rules": rules,
    }
    path = folder / "rules.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def save_source(folder: Path, state: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "source.safetensors")


def assert_refused_in_dry_run_and_real_run(rules: Path, *needles: str) -> None:
    """Both runs fail the same way, asking for ``init:``, and nothing is written."""
    for dry_run in (True, False):
        with pytest.raises(FitError, match="give the op init") as caught:
            apply_file(rules, dry_run=dry_run)
        for needle in needles:
            assert needle in str(caught.value), (dry_run, str(caught.value))
    assert not (rules.parent / "out.safetensors").exists()


def test_fill_missing_multihead_attention_layer_end_to_end(tmp_path: Path) -> None:
    from torchvision.models.vision_transformer import VisionTransformer

    save_source(tmp_path, VisionTransformer(**VIT_KW).state_dict())
    grown = dict(VIT_KW, num_layers=2)
    layer = "encoder.layers.encoder_layer_1."
    rules = write_rules(
        tmp_path,
        {"model": VIT, "kwargs": grown},
        [{"op": "fill_missing", "pattern": "^" + layer.replace(".", r"\.")}],
        seed=3,
    )
    dry = apply_file(rules, dry_run=True)
    assert dry["check"]["ok"] and not (tmp_path / "out.safetensors").exists()
    report = apply_file(rules)
    assert report["check"] == dry["check"]

    out = load_file(tmp_path / "out.safetensors")
    model = VisionTransformer(**grown).eval()
    model.load_state_dict(out, strict=True)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()

    # What building this MultiheadAttention under its seed gives, byte for byte: its
    # out_proj's reset, then its own _reset_parameters() (xavier in_proj, zero biases).
    attn = layer + "self_attention."
    torch.manual_seed(derive_seed(3, attn.rstrip(".")))
    own = nn.MultiheadAttention(32, 2, batch_first=True).state_dict()
    assert torch.equal(out[attn + "in_proj_weight"], own["in_proj_weight"])
    assert torch.count_nonzero(out[attn + "in_proj_bias"]) == 0
    bound = math.sqrt(6 / (32 + 3 * 32))  # xavier_uniform_ on the (96, 32) in_proj_weight
    assert 0.9 * bound < out[attn + "in_proj_weight"].abs().max() <= bound
    # out_proj is a Linear (kaiming bound 1/sqrt(32)) whose bias MultiheadAttention zeroes.
    assert 0.9 / math.sqrt(32) < out[attn + "out_proj.weight"].abs().max() <= 1 / math.sqrt(32)
    assert torch.count_nonzero(out[attn + "out_proj.bias"]) == 0
    assert torch.equal(out[layer + "ln_1.weight"], torch.ones(32))


def test_dry_run_refuses_what_the_real_run_cannot_make(tmp_path: Path) -> None:
    from torchvision.models.vision_transformer import VisionTransformer

    # encoder.pos_embedding belongs to a module with no reset_parameters(): the constructor
    # draws it, and nothing can draw it again.
    save_source(tmp_path, VisionTransformer(**VIT_KW).state_dict())
    rules = write_rules(
        tmp_path,
        {"model": VIT, "kwargs": dict(VIT_KW, image_size=64)},
        [{"op": "reinit_mismatched", "pattern": "pos_embedding"}],
    )
    assert_refused_in_dry_run_and_real_run(rules, "'encoder.pos_embedding'", "(Encoder)")


W2V = dict(
    vocab_size=20,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=[8, 8],
    conv_stride=[5, 2],
    conv_kernel=[10, 3],
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
)


def test_values_no_init_writes_are_refused_not_written(tmp_path: Path) -> None:
    import transformers

    # Wav2Vec2's positional conv is weight-normed; transformers' _init_weights writes the
    # computed weight, never the parametrization's original0/original1 that hold it.
    model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**W2V))
    save_source(tmp_path, {k: v for k, v in model.state_dict().items() if ".original" not in k})
    target = {"model": "transformers:Wav2Vec2ForCTC", "kwargs": W2V}
    rules = write_rules(tmp_path, target, [{"op": "fill_missing"}])
    assert_refused_in_dry_run_and_real_run(rules, "original0", "original1", "leaves them unset")

    # The remedy the message names works.
    rules = write_rules(tmp_path, target, [{"op": "fill_missing", "init": "normal"}])
    apply_file(rules)
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "out.safetensors").values())


class HalfReset(nn.Module):
    """A module whose reset_parameters() leaves part of its state as allocated."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(4, 4))
        self.scale = nn.Parameter(torch.empty(4))
        self.register_buffer("steps", torch.empty(3, dtype=torch.int64))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


@pytest.mark.parametrize("key", ["0.scale", "0.steps"])
def test_values_a_reset_leaves_alone_are_refused(key: str) -> None:
    with torch.device("meta"):
        model = nn.Sequential(HalfReset())
    target = TargetInfo("model", expected_from_model(model), model)
    spec = parse_rules({"rules": [{"op": "fill_missing", "pattern": f"^{key}$"}]})
    with pytest.raises(FitError, match=rf"'{key}'.*leaves them unset.*give the op init"):
        run_rules(spec, {}, target)
    spec = parse_rules({"rules": [{"op": "fill_missing", "pattern": r"^0\.weight$"}]})
    assert torch.equal(materialise(run_rules(spec, {}, target)[0])["0.weight"], torch.ones(4, 4))


def test_gpt2_c_proj_takes_transformers_scaled_init() -> None:
    import transformers

    kwargs = dict(vocab_size=100, n_positions=16, n_embd=64, n_layer=12, n_head=4)
    model = build_model("transformers:GPT2LMHeadModel", kwargs)
    target = TargetInfo("model", expected_from_model(model), model)
    keys = [f"transformer.h.1.{part}" for part in ("attn.c_proj", "mlp.c_proj", "attn.c_attn")]
    table = {f"{k}.{t}": from_tensor(torch.zeros(1), k) for k in keys for t in ("weight", "bias")}
    spec = parse_rules({"rules": [{"op": "reinit_mismatched"}]})
    fresh = materialise(run_rules(spec, table, target)[0])

    torch.manual_seed(0)
    own = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).state_dict()
    scaled = 0.02 / math.sqrt(2 * 12)  # GPT2Attention/GPT2MLP re-draw their c_proj with this
    for key, std in zip(keys, (scaled, scaled, 0.02), strict=True):
        weight = fresh[f"{key}.weight"]
        assert weight.std().item() == pytest.approx(std, rel=0.08), key
        assert weight.std().item() == pytest.approx(own[f"{key}.weight"].std().item(), rel=0.1)
        assert abs(weight.mean().item()) < 0.1 * std
        assert torch.count_nonzero(fresh[f"{key}.bias"]) == 0


def test_real_model_target_is_left_untouched() -> None:
    import transformers

    torch.manual_seed(0)
    kwargs = dict(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs))  # as load_into has
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = TargetInfo("model", expected_from_model(model), model)
    spec = parse_rules({"rules": [{"op": "fill_missing", "pattern": r"^transformer\.h\.1\."}]})
    fresh = materialise(run_rules(spec, {}, target)[0])
    assert fresh["transformer.h.1.attn.c_proj.weight"].std().item() == pytest.approx(
        0.02 / math.sqrt(4), rel=0.15
    )
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class Gate(nn.Module):
    """Owns a parameter and a large child, and its reset reaches into the child, as
    nn.MultiheadAttention's does into out_proj."""

    seen: list[str] = []

    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(4))
        self.big = nn.Linear(features, features)  # 1 GiB of float32 at 16384
        self.reset_parameters()

    def reset_parameters(self) -> None:
        Gate.seen.append(self.big.weight.device.type)
        nn.init.ones_(self.scale)
        nn.init.zeros_(self.big.bias)


def test_an_owner_with_a_large_subtree_is_made_without_materialising_it() -> None:
    with torch.device("meta"):
        model = Gate(1 << 14)
    target = TargetInfo("model", expected_from_model(model), model)
    Gate.seen.clear()
    out, _ = run_rules(
        parse_rules({"rules": [{"op": "fill_missing", "pattern": "^scale$"}]}), {}, target
    )
    assert torch.equal(out["scale"].load(), torch.ones(4))
    assert Gate.seen == ["meta"]  # the child stayed on the meta device


def test_same_seed_same_bytes_and_one_key_does_not_depend_on_the_others() -> None:
    with torch.device("meta"):
        model = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True), 2
        )
    target = TargetInfo("model", expected_from_model(model), model)
    key = "layers.1.self_attn.in_proj_weight"

    def fresh(pattern: str, seed: int) -> torch.Tensor:
        spec = parse_rules({"rules": [{"op": "fill_missing", "pattern": pattern}], "seed": seed})
        return run_rules(spec, {}, target)[0][key].load()

    alone, among_all = fresh(f"^{re.escape(key)}$", 5), fresh(r"^layers\.", 5)
    assert torch.equal(alone, among_all)
    assert not torch.equal(alone, fresh(r"^layers\.", 6))


def test_fresh_values_kept_for_the_writer_are_capped_per_run_not_per_op() -> None:
    from ckptsurgeon.engine.plan import run_rules
    from ckptsurgeon.rules.document import parse_rules
    from ckptsurgeon.targets.spec import TargetInfo, expected_from_model

    model = nn.Sequential(nn.Linear(1000, 1000), nn.Linear(1000, 1000))
    one = (1000 * 1000 + 1000) * 4
    target = TargetInfo("model", expected_from_model(model), model, fresh_room=one + 10)
    rules = parse_rules([{"op": "fill_missing", "pattern": f"^{i}\\."} for i in range(2)])
    out, _ = run_rules(rules, {}, target)
    assert target.fresh_room == 10  # the second layer's values are made again when written
    for i in range(2):
        weight = out[f"{i}.weight"].load()
        assert weight.shape == (1000, 1000) and weight.abs().max() <= 1 / 1000**0.5
