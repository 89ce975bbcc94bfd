"""merge_lora against the real peft: adapters that peft makes and saves on tiny transformers
models (every option that changes the merge), merged by ckptsurgeon, must equal
``PeftModel.from_pretrained(base, adapter).merge_and_unload()`` and compute what the adapter
model computes; bad adapters fail with their exit code and a message naming the problem."""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_BERT, assert_clean_failure

import ckptsurgeon
from ckptsurgeon.engine.uptodate import recorded
from ckptsurgeon.errors import FitError, InputError, UsageError
from ckptsurgeon.formats import open_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

LLAMA = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)  # fmt: skip
GPT2 = dict(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)


def llama() -> torch.nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))


def bert() -> torch.nn.Module:
    config = transformers.BertConfig(**TINY_BERT, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def gpt2() -> torch.nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2))


class ConvNet(torch.nn.Module):
    """A 3x3 conv and a 1x1 conv: both of PEFT's conv delta paths."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.mix = torch.nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.relu(self.stem(x)))


def tokens(vocab: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(1))


# name -> (model builder, LoraConfig kwargs, model input)
CASES: dict[str, tuple[Callable[[], torch.nn.Module], dict, Callable[[], torch.Tensor]]] = {
    "llama_plain": (
        llama,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        tokens(64),
    ),
    "llama_rslora": (
        llama,
        dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"]),
        tokens(64),
    ),
    "llama_patterns": (
        llama,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
            rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 6},
            alpha_pattern={"o_proj": 3, r"layers\.0\.mlp\.up_proj": 5},
        ),
        tokens(64),
    ),
    "llama_dora": (
        llama,
        dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "gate_proj"]),
        tokens(64),
    ),
    "llama_embedding_head": (
        llama,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["embed_tokens", "k_proj"],
            modules_to_save=["lm_head"],
        ),
        tokens(64),
    ),
    "bert_bias_classifier": (
        bert,
        dict(
            r=4,
            lora_alpha=8,  # scaling 2: the lora_B bias is scaled too
            target_modules=["query", "value"],
            lora_bias=True,
            task_type="SEQ_CLS",
        ),
        tokens(100),
    ),
    "gpt2_fan_in_fan_out": (
        gpt2,
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
        tokens(50),
    ),
    "conv": (
        ConvNet,
        dict(r=2, lora_alpha=4, target_modules=["stem", "mix"]),
        lambda: torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
    ),
}


@dataclass
class Made:
    """One case's files and what peft says about them."""

    folder: Path
    base: Path  # base weights, safetensors
    adapter: Path  # peft's save_pretrained folder
    build: Callable[[], torch.nn.Module]
    merged: dict[str, torch.Tensor]  # merge_and_unload()'s state dict
    outputs: torch.Tensor  # the adapter model's (unmerged) outputs
    inputs: torch.Tensor


def run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def save_base(model: torch.nn.Module, path: Path) -> None:
    # Tied tensors (GPT-2's lm_head) saved as copies: every state_dict key is in the file.
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, path)


def make_case(folder: Path, name: str, dtype: torch.dtype = torch.float32) -> Made:
    build, kwargs, inputs = CASES[name]
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = build().eval().to(dtype)
    base_path = folder / "base.safetensors"
    save_base(base, base_path)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    with torch.no_grad():  # as if trained: B (zero when fresh), magnitudes, biases, heads
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    adapter = folder / "adapter"
    peft_model.save_pretrained(adapter)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    x = inputs()
    outputs = run(loaded, x)
    merged = {k: v.detach().clone() for k, v in loaded.merge_and_unload().state_dict().items()}
    return Made(folder, base_path, adapter, build, merged, outputs, x)


@pytest.fixture(scope="session")
def made(tmp_path_factory) -> Callable[[str], Made]:
    """Each case made once per session, on first use."""
    cache: dict[str, Made] = {}

    def get(name: str) -> Made:
        if name not in cache:
            cache[name] = make_case(tmp_path_factory.mktemp(name), name)
        return cache[name]

    return get


def merge(source: Path, adapter: Path, output: Path, **op) -> dict:
    rules = {"source": str(source), "output": str(output)}
    rules["rules"] = [{"op": "merge_lora", "adapter": str(adapter), **op}]
    return ckptsurgeon.apply(rules)


def state_of(path: Path) -> dict[str, torch.Tensor]:
    return {n: r.load() for n, r in open_checkpoint(path).tensors.items()}


def assert_matches_peft(ours: dict[str, torch.Tensor], case: Made) -> None:
    assert sorted(ours) == sorted(case.merged)
    for key, expected in case.merged.items():
        assert ours[key].dtype == expected.dtype, key
        torch.testing.assert_close(ours[key], expected, rtol=0, atol=1e-6, msg=key)
    model = case.build().eval()
    model.load_state_dict(ours, strict=True)
    torch.testing.assert_close(run(model, case.inputs), case.outputs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in CASES if n != "llama_plain"])
def test_merge_equals_peft_merge_and_unload(made, tmp_path: Path, name: str) -> None:
    case = made(name)
    report = merge(case.base, case.adapter, tmp_path / "out.safetensors")
    ours = state_of(tmp_path / "out.safetensors")
    assert_matches_peft(ours, case)
    base = state_of(case.base)
    changed = {k for k in ours if not torch.equal(ours[k], base[k])}
    assert changed and changed == {
        k for k in case.merged if not torch.equal(case.merged[k], base[k])
    }
    assert report["counts"]["merged lora"] > 0


def test_cli_apply_with_paths_relative_to_the_rules_file(made, tmp_path: Path, run_cli) -> None:
    case = made("llama_plain")
    rules = case.folder / "rules.yaml"
    rules.write_text(
        "version: 1\nsource: base.safetensors\noutput: merged.safetensors\n"
        "rules:\n  - {op: merge_lora, adapter: adapter}\n"
    )
    proc = run_cli("apply", rules, cwd=tmp_path)  # the cwd is elsewhere: paths are the file's
    assert proc.returncode == 0, proc.stderr
    ours = state_of(case.folder / "merged.safetensors")
    assert_matches_peft(ours, case)
    for layer in (0, 1):
        for proj in ("q_proj", "v_proj"):
            assert not torch.equal(ours[f"model.layers.{layer}.self_attn.{proj}.weight"],
                                   state_of(case.base)[f"model.layers.{layer}.self_attn.{proj}.weight"])  # fmt: skip
    # The adapter is an input: the up-to-date record lists its files.
    record = json.loads(recorded(str(case.folder / "merged.safetensors")))
    paths = {Path(entry["path"]).name for entry in record["inputs"]}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= paths


def test_dry_run_names_merged_keys_and_reads_no_tensor_data(made, monkeypatch) -> None:
    case = made("llama_plain")

    def no_reading(span):
        raise AssertionError(f"tensor data read from {span.path}")

    monkeypatch.setattr("ckptsurgeon.formats.safetensors_io.read_span", no_reading)
    with pytest.raises(AssertionError, match="tensor data read"):  # the patch bites
        next(
            iter(open_checkpoint(case.adapter / "adapter_model.safetensors").tensors.values())
        ).load()
    report = ckptsurgeon.apply(
        {"source": str(case.base), "rules": [{"op": "merge_lora", "adapter": str(case.adapter)}]},
        dry_run=True,
    )
    actions = {k["name"]: k["actions"] for k in report["keys"]}
    assert actions["model.layers.0.self_attn.q_proj.weight"] == ["merged lora (r=4, scaling 2)"]
    assert actions["model.layers.1.self_attn.v_proj.weight"] == ["merged lora (r=4, scaling 2)"]
    assert actions["model.layers.0.self_attn.k_proj.weight"] == ["kept"]
    assert report["counts"]["merged lora"] == 4


@pytest.mark.parametrize(
    "rename",
    [
        pytest.param(lambda k: k.removeprefix("model."), id="bare-LlamaModel-names"),
        pytest.param(lambda k: "module." + k, id="extra-prefix"),
    ],
)
def test_base_saved_under_other_names(made, tmp_path: Path, rename) -> None:
    case = made("llama_plain")
    base = {rename(k): v for k, v in state_of(case.base).items() if k != "lm_head.weight"}
    save_file(base, tmp_path / "base.safetensors")
    merge(tmp_path / "base.safetensors", case.adapter, tmp_path / "out.safetensors")
    ours = state_of(tmp_path / "out.safetensors")
    expected = {rename(k): v for k, v in case.merged.items() if k != "lm_head.weight"}
    assert sorted(ours) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key], rtol=0, atol=1e-6)


def test_scale_multiplies_the_scaling(made, tmp_path: Path) -> None:
    case = made("llama_plain")
    halved = tmp_path / "halved"
    shutil.copytree(case.adapter, halved)
    config = json.loads((halved / "adapter_config.json").read_text())
    config["lora_alpha"] /= 2
    (halved / "adapter_config.json").write_text(json.dumps(config))
    merge(case.base, case.adapter, tmp_path / "scaled.safetensors", scale=0.5)
    merge(case.base, halved, tmp_path / "halved.safetensors")
    scaled, reference = (
        state_of(tmp_path / "scaled.safetensors"),
        state_of(tmp_path / "halved.safetensors"),
    )
    for key in reference:
        assert torch.equal(scaled[key], reference[key]), key
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(scaled[q], case.merged[q])


def test_bfloat16_base_merges_in_float32_and_stays_bfloat16(tmp_path: Path) -> None:
    case = make_case(tmp_path / "bf16", "llama_plain", torch.bfloat16)
    merge(case.base, case.adapter, tmp_path / "out.safetensors")
    ours = state_of(tmp_path / "out.safetensors")
    for key, expected in case.merged.items():
        assert ours[key].dtype == torch.bfloat16
        assert torch.equal(ours[key], expected), key  # one rounding, as peft's in-place add


# -- bad adapters ------------------------------------------------------------------------


@pytest.fixture
def adapter_copy(made, tmp_path: Path) -> tuple[Made, Path]:
    case = made("llama_plain")
    adapter = tmp_path / "adapter"
    shutil.copytree(case.adapter, adapter)
    return case, adapter


def edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_adapter_tensor_landing_on_no_key_is_exit_1(made, tmp_path: Path, run_cli) -> None:
    case = made("llama_plain")
    base = {k: v for k, v in state_of(case.base).items() if "layers.1.self_attn.v_proj" not in k}
    save_file(base, tmp_path / "base.safetensors")
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"version: 1\nsource: base.safetensors\noutput: out.safetensors\n"
        f"rules:\n  - {{op: merge_lora, adapter: {case.adapter}}}\n"
    )
    proc = run_cli("apply", rules)
    assert_clean_failure(
        proc, 1, "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight",
        "model.layers.1.self_attn.v_proj.weight",
    )  # fmt: skip
    assert not (tmp_path / "out.safetensors").exists()


def test_shape_disagreement_is_exit_1(made, tmp_path: Path) -> None:
    case = made("llama_plain")
    base = state_of(case.base)
    base["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 8)
    save_file(base, tmp_path / "base.safetensors")
    with pytest.raises(
        FitError, match=r"q_proj.*\[16, 16\] update but .*q_proj.weight' is \[16, 8\]"
    ):
        merge(tmp_path / "base.safetensors", case.adapter, tmp_path / "out.safetensors")


def test_ambiguous_landing_is_exit_1(made, tmp_path: Path) -> None:
    case = made("llama_plain")
    bare = {k.removeprefix("model."): v for k, v in state_of(case.base).items()}
    base = {
        **{"enc." + k: v for k, v in bare.items()},
        **{"dec." + k: v.clone() for k, v in bare.items()},
    }
    save_file(base, tmp_path / "base.safetensors")
    with pytest.raises(FitError, match="several ways"):
        merge(tmp_path / "base.safetensors", case.adapter, tmp_path / "out.safetensors")


@pytest.mark.parametrize(
    ("change", "error", "needle"),
    [
        (dict(r=8), UsageError, "r=8"),
        (dict(peft_type="IA3"), UsageError, "peft_type 'IA3'"),
        (dict(trainable_token_indices=[1, 2]), UsageError, "trainable tokens"),
        (dict(use_dora=True), UsageError, "lora_magnitude_vector"),
        (dict(lora_bias=True), UsageError, "lora_B.bias"),
        (dict(rank_pattern={"q_proj": 0}), UsageError, "positive integer"),
    ],
)
def test_config_inconsistent_or_unsupported_is_exit_2(
    adapter_copy, tmp_path: Path, change, error, needle
) -> None:
    case, adapter = adapter_copy
    edit_config(adapter, **change)
    with pytest.raises(error, match=needle) as info:
        merge(case.base, adapter, tmp_path / "out.safetensors")
    assert info.value.exit_code == 2


def test_config_missing_is_exit_2_weights_missing_or_corrupt_exit_3(
    adapter_copy, tmp_path: Path
) -> None:
    case, adapter = adapter_copy
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        merge(case.base, adapter, tmp_path / "out.safetensors")
    weights.unlink()
    with pytest.raises(InputError, match=r"no adapter_model\.safetensors or adapter_model\.bin"):
        merge(case.base, adapter, tmp_path / "out.safetensors")
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(UsageError, match=r"no adapter_config\.json"):
        merge(case.base, adapter, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_output_over_the_adapter_is_refused(adapter_copy) -> None:
    case, adapter = adapter_copy
    weights = adapter / "adapter_model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(UsageError, match="would overwrite the input") as info:
        merge(case.base, adapter, weights)
    assert info.value.exit_code == 2
    assert weights.read_bytes() == before


def test_torch_bin_adapter_is_read_weights_only(made, tmp_path: Path) -> None:
    case = made("llama_plain")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(case.adapter / "adapter_config.json", adapter)
    tensors = state_of(case.adapter / "adapter_model.safetensors")
    torch.save(tensors, adapter / "adapter_model.bin")
    merge(case.base, adapter, tmp_path / "out.safetensors")
    assert_matches_peft(state_of(tmp_path / "out.safetensors"), case)


class _Reduce:
    """Pickles as ``fn(*args)``: what a hostile ``.bin`` hides in its pickle."""

    def __init__(self, fn: Callable, args: tuple) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return self.fn, self.args


def test_hostile_torch_bin_adapter_is_refused_and_never_run(made, tmp_path: Path, run_cli) -> None:
    """An ``adapter_model.bin`` whose pickle calls ``os.system`` (next to a valid config
    and the adapter's real tensors), merged by a rules file through the CLI: refused with
    exit 3 naming the global, the command never runs, nothing is written."""
    case = made("llama_plain")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(case.adapter / "adapter_config.json", adapter)
    sentinel = tmp_path / "SENTINEL"
    tensors = state_of(case.adapter / "adapter_model.safetensors")
    hostile = _Reduce(os.system, (f"touch {shlex.quote(str(sentinel))}",))
    weights = adapter / "adapter_model.bin"
    torch.save({**tensors, "payload": hostile}, weights)
    assert not sentinel.exists()
    before = weights.read_bytes()
    output = tmp_path / "out.safetensors"
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"version: 1\nsource: {case.base}\noutput: {output}\n"
        f"rules:\n  - {{op: merge_lora, adapter: {adapter}}}\n"
    )
    proc = run_cli("apply", rules)
    assert not sentinel.exists(), "the pickle's payload ran"
    assert_clean_failure(proc, 3, "adapter_model.bin", f"{os.system.__module__}.system")
    assert not output.exists()
    assert weights.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "rules.yaml"]
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", weights.name]


def test_example_rules_file(tmp_path: Path, run_cli) -> None:
    """rules/merge_lora.yaml as shipped, in a copy of its folder layout (its paths are
    relative to itself), on the adapter examples/make_lora.py makes."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "examples").mkdir()
    shutil.copy(REPO / "rules" / "merge_lora.yaml", tmp_path / "rules")
    shutil.copy(REPO / "examples" / "make_lora.py", tmp_path / "examples")
    sys.path.insert(0, str(REPO / "examples"))
    import make_lora

    base, adapter = make_lora.make(tmp_path / "examples" / "checkpoints" / "tiny_llama_lora")
    proc = run_cli("apply", tmp_path / "rules" / "merge_lora.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "loads strictly" in proc.stdout
    model = make_lora.tiny_llama()
    model.load_state_dict(state_of(base))
    expected = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    ours = state_of(tmp_path / "examples" / "out" / "tiny_llama_merged.safetensors")
    assert sorted(ours) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key], rtol=0, atol=1e-6)
