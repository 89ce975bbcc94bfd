"""Property-based tests (hypothesis), in process so each example costs milliseconds.

* Random mutations of a valid safetensors file (header fields, the length prefix, the data
  length, raw bytes) always end in success or exit 3: never a traceback, an "internal
  error" or a hang.
* Random byte flips in a file ckptsurgeon wrote: ``inspect --verify`` always exits 0 or 3,
  and always 3 when the flip is in tensor data.
* Random rules documents always end in exit 0, 1 or 2, and when the plan succeeds the
  write does too.

The runs are derandomised (the same examples every time) so CI is repeatable; set
``CKPTSURGEON_FUZZ_EXAMPLES`` to explore further locally.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptsurgeon.cli import cli
from ckptsurgeon.formats import safetensors_io, write_checkpoint
from ckptsurgeon.formats.table import from_tensor

SCALE = int(os.environ.get("CKPTSURGEON_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=SCALE or 300,
    deadline=None,  # hangs are caught by the alarm below, not by timing noise
    derandomize=not SCALE,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HANG_SECONDS = 10


@contextlib.contextmanager
def no_hang(seconds: int = HANG_SECONDS) -> Iterator[None]:
    """Fail an example that runs for ``seconds`` (SIGALRM; main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def hung(*_: Any) -> None:
        raise AssertionError(f"no result within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _invoke(*args: object) -> tuple[int, str]:
    with no_hang():
        result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout + result.stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --------------------------------------------------------------------------------------
# safetensors headers and lengths

_BASE = {
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]},
    "c": {"dtype": "BF16", "shape": [4], "data_offsets": [40, 48]},
}
_BASE_DATA = bytes(range(48))
_DTYPES = [*safetensors_io.DTYPE_BITS, "F128", "f32", "", "bf16"]
_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 50), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
_DIM = st.one_of(st.integers(0, 8), st.integers(-3, 2**65), _ANY)
_OFFSET = st.one_of(st.integers(0, 64), st.integers(-(2**65), 2**66), _ANY)


@st.composite
def _entry_mutation(draw: st.DrawFn, entry: Any) -> Any:
    entry = dict(entry) if isinstance(entry, dict) and entry else dict(_BASE["a"])
    kind = draw(
        st.sampled_from(["dtype", "shape", "offsets", "drop-field", "extra-field", "replace"])
    )
    if kind == "dtype":
        entry["dtype"] = draw(st.one_of(st.sampled_from(_DTYPES), _ANY))
    elif kind == "shape":
        entry["shape"] = draw(st.one_of(st.lists(_DIM, max_size=4), _ANY))
    elif kind == "offsets":
        entry["data_offsets"] = draw(st.one_of(st.lists(_OFFSET, max_size=3), _ANY))
    elif kind == "drop-field":
        entry.pop(draw(st.sampled_from(sorted(entry))), None)
    elif kind == "extra-field":
        entry[draw(st.text(max_size=6))] = draw(_ANY)
    else:
        return draw(_ANY)
    return entry


@st.composite
def mutated_file(draw: st.DrawFn) -> bytes:
    header: dict[str, Any] = {k: dict(v) for k, v in _BASE.items()}
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from([*sorted(header), "d", "__metadata__", ""]))
        if name == "__metadata__":
            header[name] = draw(
                st.one_of(
                    st.dictionaries(
                        st.text(max_size=20), st.one_of(st.text(max_size=70), _ANY), max_size=3
                    ),
                    st.fixed_dictionaries(
                        {
                            safetensors_io.DIGEST_KEY: st.text(
                                "0123456789abcdef", min_size=0, max_size=70
                            ),
                            safetensors_io.TENSOR_DIGESTS_KEY: st.text(
                                "0123456789abcdef", max_size=200
                            ),
                        }
                    ),
                    _ANY,
                )
            )
        elif name in header and draw(st.booleans()):
            header[name] = draw(_entry_mutation(header[name]))
        elif name in header:
            del header[name]
        else:
            header[name] = draw(_entry_mutation(_BASE["a"]))
    try:
        text = json.dumps(header, allow_nan=True)
    except (TypeError, ValueError):
        text = "{}"
    if draw(st.booleans()) and len(header) > 1:  # a duplicated key, which JSON parsers keep
        first = next(iter(header))
        text = text[:-1] + f", {json.dumps(first)}: {json.dumps(header[first], allow_nan=True)}}}"
    raw = text.encode("utf-8", errors="surrogatepass")
    raw += draw(st.sampled_from([b"", b" " * (-len(raw) % 8), b"\0", b"   \n"]))
    for _ in range(draw(st.integers(0, 2))):  # raw byte flips in the header
        if raw:
            at = draw(st.integers(0, len(raw) - 1))
            raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    length = len(raw) + draw(
        st.one_of(st.just(0), st.integers(-16, 16), st.integers(-(2**20), 2**64 - 1 - len(raw)))
    )
    length = min(max(length, 0), 2**64 - 1)
    data = _BASE_DATA
    cut = draw(st.integers(-16, 16))
    data = data[:cut] if cut < 0 else data + bytes(cut)
    return struct.pack("<Q", length) + raw + data


@FUZZ
@given(blob=mutated_file())
def test_mutated_safetensors_end_in_success_or_exit_3(work: Path, blob: bytes) -> None:
    path = work / "mutated.safetensors"
    path.write_bytes(blob)
    code, output = _invoke("inspect", path, "--json", "--verify")
    assert code in (0, 3), output
    assert "internal error" not in output and "Traceback" not in output, output
    if code == 0:  # accepted: every tensor must then also read back
        code, output = _invoke("convert", path, work / "back.safetensors")
        assert code in (0, 3) and "internal error" not in output, output


@pytest.fixture(scope="module")
def written(work: Path) -> tuple[Path, bytes, int]:
    """A file ckptsurgeon wrote (with its digests): path, bytes, data start."""
    g = torch.Generator().manual_seed(0)
    state = {
        "w": torch.randn(8, 4, generator=g),
        "b": torch.randn(8, generator=g).half(),
        "n": torch.tensor([1, 2, 3]),
    }
    path = work / "written.safetensors"
    write_checkpoint({k: from_tensor(v, k) for k, v in state.items()}, str(path))
    return path, path.read_bytes(), safetensors_io.read_header(str(path)).data_start


@settings(FUZZ, max_examples=SCALE or 200)
@given(data=st.data())
def test_any_flipped_byte_is_refused_or_harmless_and_data_flips_are_caught(
    work: Path, written: tuple[Path, bytes, int], data: st.DataObject
) -> None:
    _, original, data_start = written
    at = data.draw(
        st.one_of(st.integers(0, len(original) - 1), st.integers(data_start, len(original) - 1))
    )
    bit = data.draw(st.integers(0, 7))
    blob = bytearray(original)
    blob[at] ^= 1 << bit
    path = work / "flipped.safetensors"
    path.write_bytes(bytes(blob))
    code, output = _invoke("inspect", path, "--verify")
    assert code in (0, 3), output
    assert "internal error" not in output and "Traceback" not in output, output
    if at >= data_start:
        assert code == 3 and "corrupt data in tensor" in output, (at, output)


# --------------------------------------------------------------------------------------
# rules documents

_OPS = [
    "strip_prefix", "add_prefix", "rename", "map", "drop", "keep", "cast", "transpose",
    "reshape", "split", "merge", "copy", "resize", "adapt_input_channels",
    "reinit_mismatched", "fill_missing", "nope",
]  # fmt: skip
_REGEX = st.text(alphabet="module.fcqkvembweightbias_()[]^$*+?|\\{}0123:<>", max_size=14)
_NAME = st.text(alphabet="module.fcqkvembweightbias_\\1{}0g<>", max_size=14)
_SMALL = st.integers(-3, 16)
_FIELDS: dict[str, st.SearchStrategy] = {
    "prefix": st.one_of(st.sampled_from(["module.", "model.", ""]), _NAME),
    "pattern": st.one_of(
        st.sampled_from([r"^module\.", r"weight$", r"^(q|k|v)\.", r"^fc\."]), _REGEX
    ),
    "replace": st.one_of(st.sampled_from(["", r"\1", r"\g<0>", "x.", r"\9"]), _NAME),
    "mapping": st.dictionaries(
        st.sampled_from(["module.fc.weight", "emb.weight", "x"]), _NAME, max_size=3
    ),
    "dtype": st.sampled_from(
        ["float16", "bfloat16", "float32", "int8", "bool", "fp8_e4m3", "nope", "complex64"]
    ),
    "dims": st.lists(_SMALL, max_size=3),
    "shape": st.lists(st.integers(-2, 48), max_size=4),
    "into": st.lists(_NAME, max_size=4),
    "dim": _SMALL,
    "sizes": st.lists(st.integers(-1, 12), max_size=4),
    "group": st.one_of(_SMALL, _NAME),
    "order": st.lists(st.sampled_from(["q", "k", "v", "x"]), max_size=4),
    "size": st.one_of(st.integers(-1, 40)),
    "init": st.sampled_from(
        ["zeros", "normal", "mean", "xavier_uniform", "kaiming_uniform", "nope"]
    ),
    "std": st.floats(-1, 1),
    "channels": st.integers(-1, 6),
    "optional": st.booleans(),
    "patern": _REGEX,  # a typo: an unknown field
}
_ANY_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=6)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def _op(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 20)) == 0:
        return draw(_ANY_VALUE)
    op: dict[str, Any] = {"op": draw(st.sampled_from(_OPS))}
    for field in draw(st.lists(st.sampled_from(sorted(_FIELDS)), max_size=5, unique=True)):
        op[field] = draw(_FIELDS[field])
    return op


@st.composite
def rules_document(draw: st.DrawFn, source: Path, manifest: Path) -> str:
    if draw(st.integers(0, 30)) == 0:  # not a mapping, or not even YAML
        return draw(st.one_of(st.text(max_size=40), st.just("rules: [\n"), st.just("- a\n- b\n")))
    doc: dict[str, Any] = {"version": draw(st.sampled_from([1, 1, 1, 2, "1"]))}
    target = draw(
        st.sampled_from(
            [
                None,
                {"model": "torch.nn:Linear", "kwargs": {"in_features": 4, "out_features": 2}},
                {"model": "torch.nn:Linear", "kwargs": {"in_features": 4}},
                {"checkpoint": str(source)},
                {"manifest": str(manifest)},
                {"model": "torch.nn:Linear", "checkpoint": str(source)},
                {"manifest": str(manifest), "kwargs": {"x": 1}},
            ]
        )
    )
    if target is not None:
        doc["target"] = target
    if draw(st.booleans()):
        doc["output"] = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "dtype": _FIELDS["dtype"],
                    "max_shard_size": st.sampled_from(["1KB", "0", "-1GB", "lots", 100]),
                },
            )
        )
    if draw(st.booleans()):
        doc["seed"] = draw(st.one_of(st.integers(-(2**40), 2**40), st.text(max_size=3)))
    if draw(st.booleans()):
        doc["check"] = {
            draw(st.sampled_from(["allow_missing", "allow_unexpected", "allow_anything"])): draw(
                st.lists(_REGEX, max_size=2)
            )
        }
    doc["rules"] = draw(st.lists(_op(), max_size=5))
    if draw(st.integers(0, 15)) == 0:
        doc[draw(st.sampled_from(["rulez", "sauce"]))] = draw(_ANY_VALUE)
    return yaml.safe_dump(doc, sort_keys=False)


@pytest.fixture(scope="module")
def rules_inputs(work: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    state = {
        "module.weight": torch.randn(2, 4, generator=g),
        "module.bias": torch.randn(2, generator=g),
        "module.fc.weight": torch.randn(2, 4, generator=g),
        "q.weight": torch.randn(4, 4, generator=g),
        "k.weight": torch.randn(4, 4, generator=g),
        "v.weight": torch.randn(4, 4, generator=g),
        "qkv.weight": torch.randn(12, 4, generator=g),
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "emb.weight": torch.randn(10, 4, generator=g),
        "step": torch.tensor(3),
    }
    source = work / "rules_src.safetensors"
    write_checkpoint({k: from_tensor(v, k) for k, v in state.items()}, str(source))
    manifest = work / "manifest.json"
    code, output = _invoke("inspect", source, "--json")
    assert code == 0, output
    manifest.write_text(output)
    return source, manifest


@pytest.mark.filterwarnings("ignore::FutureWarning")  # "possible nested set" in a regex
@settings(FUZZ, max_examples=SCALE or 200)
@given(data=st.data())
def test_random_rules_documents_end_in_exit_0_1_or_2(
    work: Path, rules_inputs: tuple[Path, Path], data: st.DataObject
) -> None:
    source, manifest = rules_inputs
    text = data.draw(rules_document(source, manifest))
    rules = work / "rules.yaml"
    rules.write_text(text)
    out = work / "out.safetensors"
    common = ["--source", source, "--output", out, "--no-finetune", "--quiet"]
    code, output = _invoke("apply", rules, *common, "--dry-run", "--json")
    assert code in (0, 1, 2), output
    assert "internal error" not in output and "Traceback" not in output, (text, output)
    if code == 0:  # a plan that passes must also write
        code, output = _invoke("apply", rules, *common)
        assert code == 0, (text, output)
        code, output = _invoke("inspect", out, "--verify")
        assert code == 0, (text, output)
