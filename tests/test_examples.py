"""Every example in rules/ run through the CLI, checked for function, not just key names."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from ckptsurgeon.formats import open_checkpoint

sys.path.insert(0, str(REPO / "examples"))
import make_checkpoints as make

RULES = REPO / "rules"


def apply(run_cli, rules: str, source: Path, output: Path, *extra: str) -> None:
    proc = run_cli("apply", RULES / rules, "--source", source, "--output", output, *extra)
    assert proc.returncode == 0, proc.stderr
    assert output.exists()


def state_of(path: Path) -> dict[str, torch.Tensor]:
    return {n: r.load() for n, r in open_checkpoint(path).tensors.items()}


def resnet18(num_classes: int, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    import torchvision

    model = torchvision.models.resnet18(num_classes=num_classes).eval()
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


def test_dataparallel_into_new_head(tmp_path: Path, run_cli) -> None:
    src = make.resnet18_dp(tmp_path)
    out_a, out_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    apply(run_cli, "dataparallel_new_head.yaml", src, out_a)
    apply(run_cli, "dataparallel_new_head.yaml", src, out_b)
    assert out_a.read_bytes() == out_b.read_bytes()  # same inputs, rules, seed: same bytes

    original = torch.load(src, weights_only=True)
    source_model = resnet18(1000, {k.removeprefix("module."): v for k, v in original.items()})
    new_model = resnet18(10, state_of(out_a))
    source_model.fc = new_model.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(new_model(x), source_model(x), rtol=0, atol=0)


def test_dataparallel_head_init_is_the_targets_own_and_seeded(tmp_path: Path, run_cli) -> None:
    src = make.resnet18_dp(tmp_path)
    out = tmp_path / "o.safetensors"
    apply(run_cli, "dataparallel_new_head.yaml", src, out)
    fc = state_of(out)["fc.weight"]
    bound = 1 / 512**0.5  # nn.Linear.reset_parameters: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert fc.shape == (10, 512)
    assert fc.abs().max() <= bound and fc.abs().max() > 0.9 * bound
    assert not torch.equal(fc, torch.load(src, weights_only=True)["module.fc.weight"][:10])


@pytest.mark.parametrize(
    ("maker", "rules", "container", "prefix"),
    [
        ("resnet18_lightning", "lightning_to_plain.yaml", "state_dict", "model."),
        ("resnet18_compiled_train", "compiled_training_container.yaml", "model", "_orig_mod."),
    ],
)
def test_containers_into_plain_model(
    tmp_path: Path, run_cli, maker, rules, container, prefix
) -> None:
    src = getattr(make, maker)(tmp_path)
    out = tmp_path / ("o.pt" if "lightning" in rules else "o.safetensors")
    apply(run_cli, rules, src, out)
    raw = torch.load(src, weights_only=True)[container]
    expected = {k.removeprefix(prefix): v for k, v in raw.items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            resnet18(10, state_of(out))(x), resnet18(10, expected)(x), rtol=0, atol=0
        )


def test_alexnet_new_classifier(tmp_path: Path, run_cli) -> None:
    import torchvision

    src = make.alexnet(tmp_path)
    out = tmp_path / "o.safetensors"
    apply(run_cli, "alexnet_new_classifier.yaml", src, out)
    old = torchvision.models.alexnet().eval()
    old.load_state_dict(torch.load(src, weights_only=True))
    new = torchvision.models.alexnet(num_classes=10).eval()
    new.load_state_dict(state_of(out), strict=True)
    assert new.classifier[6].weight.shape == (10, 4096)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        before = old.classifier[:6](torch.flatten(old.avgpool(old.features(x)), 1))
        after = new.classifier[:6](torch.flatten(new.avgpool(new.features(x)), 1))
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_stem_to_grayscale(tmp_path: Path, run_cli) -> None:
    sys.path.insert(0, str(RULES))
    from models import resnet18_grayscale

    src = make.resnet18_plain(tmp_path)
    out = tmp_path / "o.safetensors"
    apply(run_cli, "stem_to_grayscale.yaml", src, out)
    rgb = resnet18(10, torch.load(src, weights_only=True))
    gray = resnet18_grayscale(num_classes=10).eval()
    gray.load_state_dict(state_of(out), strict=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():  # a gray image is an RGB image with three equal channels
        torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)


def _bert(cls_name: str, **overrides):
    import transformers

    cls = getattr(transformers, cls_name)
    return cls(transformers.BertConfig(**{**make.BERT, **overrides})).eval()


def test_hf_encoder_into_sequence_classifier(tmp_path: Path, run_cli) -> None:
    from transformers import BertModel

    src = make.bert_encoder(tmp_path)
    out = tmp_path / "cls"
    apply(run_cli, "hf_encoder_to_classifier.yaml", src, out)
    model = _bert("BertForSequenceClassification", num_labels=3)
    model.load_state_dict(state_of(out), strict=True)
    encoder = BertModel.from_pretrained(src).eval()
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model.bert(ids).pooler_output, encoder(ids).pooler_output)
    # transformers' own init for a new head: N(0, initializer_range=0.02), zero bias
    weight = model.classifier.weight
    assert abs(weight.std().item() - 0.02) < 0.006
    assert torch.count_nonzero(model.classifier.bias) == 0


def test_resize_vocabulary(tmp_path: Path, run_cli) -> None:
    from transformers import BertModel

    src = make.bert_encoder(tmp_path)
    out = tmp_path / "o.safetensors"
    apply(run_cli, "resize_vocabulary.yaml", src, out)
    model = _bert("BertModel", vocab_size=528)
    model.load_state_dict(state_of(out), strict=True)
    old = BertModel.from_pretrained(src).eval()
    emb = model.embeddings.word_embeddings.weight
    torch.testing.assert_close(
        emb[512:], old.embeddings.word_embeddings.weight.mean(0).expand(16, -1)
    )
    ids = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, old(ids).last_hidden_state)


def test_minilm_from_the_hf_cache_into_a_classifier_folder(tmp_path: Path, run_cli) -> None:
    """rules/minilm_to_classifier.yaml: hf:// -> rules -> folder -> from_pretrained, with the
    encoder computing what the source computed."""
    import os
    import subprocess
    import sys

    import make_hf_cache
    import transformers

    make_hf_cache.make_cache(tmp_path / "cache")
    out = tmp_path / "classifier"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "ckptsurgeon", "apply", str(RULES / "minilm_to_classifier.yaml"),
         "--output", str(out), "-q"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    source = transformers.BertModel.from_pretrained(make_hf_cache.make_cache(tmp_path / "c2"))
    batch = tokenizer(["checkpoint surgery", "offline"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval().bert(**batch).last_hidden_state, source.eval()(**batch).last_hidden_state
        )
    assert model.config.num_labels == 2


def test_a_tiny_llama_from_the_hf_cache_loads_with_from_pretrained(tmp_path: Path) -> None:
    """hf:// -> a folder output -> LlamaForCausalLM.from_pretrained: the same logits, the
    verify: section passing on the way."""
    import os
    import subprocess
    import sys

    import make_hf_cache
    import transformers
    import yaml

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    source = transformers.LlamaForCausalLM(config).eval()
    source.save_pretrained(tmp_path / "saved")
    make_hf_cache.make_cache(tmp_path / "cache", tmp_path / "saved", "tiny/llama", "a" * 40)
    kwargs = {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "max_position_embeddings")}  # fmt: skip
    model = {"model": "transformers:LlamaForCausalLM", "kwargs": kwargs}
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        yaml.safe_dump(
            {
                "source": "hf://tiny/llama",
                "target": model,
                "output": "out",
                "rules": [],
                "verify": {
                    "reference": model,
                    "inputs": [{"shape": [2, 8], "dtype": "int64", "high": 64}],
                },
            }
        )
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "ckptsurgeon", "apply", str(rules), "-q"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, source(ids).logits)
