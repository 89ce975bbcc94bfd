"""``inspect`` of safetensors reads headers only and never imports torch, yet prints exactly
what the torch path prints (``open_checkpoint`` + ``summarize``/``render``, forced here
in-process); every other input, and ``--verify``/``--key``/``--allow-global``, still goes
through torch.

Each check runs the real CLI in a subprocess that reports, on its last stderr line,
whether torch was imported.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT
from rich.console import Console
from safetensors.torch import save_file
from test_hub import _ref, _repo_dir, _store

from ckptsurgeon.errors import CkptSurgeonError
from ckptsurgeon.formats import safetensors_io
from ckptsurgeon.formats.dtypes import dtype_name
from ckptsurgeon.formats.header_table import HeaderTensor, header_tensors
from ckptsurgeon.formats.reader import open_checkpoint
from ckptsurgeon.formats.safetensors_header import DTYPE_BITS, TORCH_DTYPE_NAMES
from ckptsurgeon.formats.table import dtype_itemsize
from ckptsurgeon.reporting.inspect import render, summarize

# The real CLI, then whether torch was imported, as the last line on stderr.
PROBE = """
import sys
from ckptsurgeon.cli import cli
code = 0
try:
    cli(sys.argv[1:], prog_name="ckptsurgeon")
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
sys.stderr.write(f"torch imported: {'torch' in sys.modules}\\n")
sys.exit(code)
"""
MARK = "torch imported: "


def _cli(*args: object) -> tuple[int, str, str, bool]:
    """(exit code, stdout, stderr, torch imported) of ``ckptsurgeon ARGS``."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    err, _, mark = proc.stderr.rstrip("\n").rpartition("\n")
    if not mark.startswith(MARK):  # nothing else on stderr
        err, mark = "", mark or proc.stderr
    assert mark.startswith(MARK), proc.stderr
    return proc.returncode, proc.stdout, err + "\n" if err else "", mark == MARK + "True"


def _old_json(path: object, pattern: str | None = None, key: str | None = None) -> str:
    """What ``inspect --json`` printed before: the torch reader, summarised."""
    summary = summarize(open_checkpoint(str(path), key), pattern)
    return json.dumps(summary, indent=2) + "\n"


def _old_text(path: object, pattern: str | None = None, show_all: bool = False) -> str:
    buf = io.StringIO()
    summary = summarize(open_checkpoint(str(path)), pattern)
    render(summary, Console(file=buf, soft_wrap=True), show_all=show_all)
    return buf.getvalue()


def assert_same_as_torch_path(path: object, *, pattern: str | None = None) -> dict:
    """``inspect`` (``--json`` and text, folded and ``--all``) prints what the torch path
    printed, byte for byte, without importing torch. Returns the JSON object."""
    extra = ("--filter", pattern) if pattern else ()
    code, out, err, torch_imported = _cli("inspect", path, "--json", *extra)
    assert (code, err) == (0, ""), err
    assert out == _old_json(path, pattern)
    assert not torch_imported
    for show_all in (False, True):
        code, text, err, torch_imported = _cli(
            "inspect", path, *extra, *(("--all",) if show_all else ())
        )
        assert (code, err) == (0, ""), err
        assert text == _old_text(path, pattern, show_all)
        assert not torch_imported
    return json.loads(out)


def assert_same_failure(path: object, code: int = 3) -> None:
    """The same exit code and message as the torch path, in text and --json."""
    with pytest.raises(CkptSurgeonError) as info:
        open_checkpoint(str(path))
    assert info.value.exit_code == code
    got, out, err, _ = _cli("inspect", path)
    assert (got, out, err) == (code, "", f"ckptsurgeon: error: {info.value}\n")
    got, out, err, _ = _cli("inspect", path, "--json")
    assert (got, err) == (code, f"ckptsurgeon: error: {info.value}\n")
    error = {"type": type(info.value).__name__, "message": str(info.value), "exit_code": code}
    assert json.loads(out) == {"error": error}


# -- checkpoints written by the real libraries ------------------------------------------


def _bert():
    """The tests' tiny BERT with 4 layers: 71 tensors, past a screenful (text is folded)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(**{**TINY_BERT, "num_hidden_layers": 4}))


@pytest.fixture(scope="module")
def bert_single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bert_single")
    _bert().save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.fixture(scope="module")
def bert_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bert_sharded")
    _bert().save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder


def test_save_file_every_dtype_metadata_and_odd_shapes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tensors = {
        f"t.{name}": torch.randn(3, 2).to(getattr(torch, name))
        for name in TORCH_DTYPE_NAMES.values()
        if name != "float8_e8m0fnu"
    }
    tensors |= {"scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3), "z.last": torch.ones(7)}
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "hello [bold]"})
    got = assert_same_as_torch_path(path)
    assert got["metadata"] == {"format": "pt", "note": "hello [bold]"}
    assert got["tensors"]["scalar"] == {"shape": [], "dtype": "float32", "bytes": 4}
    assert got["tensors"]["empty"]["bytes"] == 0
    assert got["tensors"]["t.complex64"]["bytes"] == 6 * 8
    assert_same_as_torch_path(path, pattern=r"^t\.(u?int|bool)")
    assert_same_as_torch_path(path, pattern="nothing matches this")
    # not named .safetensors: found from its bytes, as before
    os.rename(path, tmp_path / "weights.bin")
    assert assert_same_as_torch_path(tmp_path / "weights.bin")["format"] == "safetensors"


def test_transformers_save_pretrained_single_file(bert_single: Path) -> None:
    got = assert_same_as_torch_path(bert_single)
    assert got["format"] == "safetensors" and len(got["tensors"]) > 40  # folded text
    assert_same_as_torch_path(bert_single / "model.safetensors")
    assert_same_as_torch_path(bert_single, pattern=r"encoder\.layer\.[13]\.")


def test_transformers_save_pretrained_sharded(bert_sharded: Path) -> None:
    got = assert_same_as_torch_path(bert_sharded)
    assert got["format"] == "safetensors-sharded" and len(got["tensors"]) > 40
    assert_same_as_torch_path(bert_sharded / "model.safetensors.index.json")
    assert_same_as_torch_path(bert_sharded, pattern="attention")


def test_lightning_style_model_prefix(tmp_path: Path) -> None:
    """Names under ``model.`` (a LightningModule's ``self.model``): without --key a flat
    format picks no container (``choose_prefix_container``), with torch or without;
    --key model takes the torch path, as before."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))

    path = tmp_path / "lightning.safetensors"
    save_file(Module().state_dict(), str(path))
    got = assert_same_as_torch_path(path)
    assert all(n.startswith("model.") for n in got["tensors"])
    assert (got["containers"], got["container"], got["note"]) == ([], None, "")

    code, out, err, torch_imported = _cli("inspect", path, "--json", "--key", "model")
    assert (code, err) == (0, "") and torch_imported
    assert out == _old_json(path, key="model")
    assert json.loads(out)["container"] == "model" and "0.weight" in json.loads(out)["tensors"]


# -- hf:// models in a Hugging Face cache -------------------------------------------------


def test_hf_model_in_the_cache(
    bert_sharded: Path, bert_single: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    main = hashlib.sha1(b"inspect-fast main").hexdigest()
    single = hashlib.sha1(b"inspect-fast single").hexdigest()
    repo = _repo_dir(cache, "tiny-org/tiny-bert")
    _store(repo, main, {p.name: p for p in bert_sharded.iterdir()})
    _store(repo, single, {p.name: p for p in bert_single.iterdir()})
    _ref(repo, "main", main)
    _ref(repo, "single", single)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no network
    for name in ("HF_HUB_OFFLINE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)

    for name in ("hf://tiny-org/tiny-bert", f"hf://tiny-org/tiny-bert@{main[:10]}"):
        got = assert_same_as_torch_path(name)
        assert (got["path"], got["format"]) == (name, "safetensors-sharded")
    got = assert_same_as_torch_path("hf://tiny-org/tiny-bert@single", pattern="pooler")
    assert got["format"] == "safetensors" and len(got["tensors"]) == 2
    assert_same_failure("hf://tiny-org/not-cached")
    assert_same_failure("hf://tiny-org/tiny-bert@no-such-tag")


# -- corrupt inputs: the same exit 3 and message ----------------------------------------


def _raw(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_corrupt_headers_fail_as_before(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(4), "b": torch.zeros(2, 2)}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-3])
    entry = '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
    cases = [
        truncated,
        _raw(tmp_path / "json.safetensors", b"{not json    ", b"12345678"),
        _raw(tmp_path / "dup.safetensors", ("{" + entry + "," + entry + "}").encode(), bytes(8)),
        _raw(tmp_path / "dtype.safetensors", entry.replace("F32", "F128").join("{}").encode()),
        _raw(tmp_path / "gap.safetensors", entry.replace("0,8", "4,12").join("{}").encode()),
        _raw(tmp_path / "meta.safetensors", b'{"__metadata__":{"a":1}}'),
        _raw(tmp_path / "utf8.safetensors", b'{"\xff":{}}'),
        tmp_path / "missing.safetensors",
    ]
    (tmp_path / "empty.safetensors").write_bytes(b"")
    cases.append(tmp_path / "empty.safetensors")
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x00")
    cases.append(tmp_path / "short.safetensors")
    for path in cases:
        assert_same_failure(path)
    code, _, err, torch_imported = _cli("inspect", truncated)
    assert code == 3 and "not a valid safetensors file" in err and not torch_imported


def test_inconsistent_shards_fail_as_before(bert_sharded: Path, tmp_path: Path) -> None:
    index = json.loads((bert_sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))

    def variant(name: str, weight_map: dict[str, str], corrupt: str | None = None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for shard in shards:
            data = (bert_sharded / shard).read_bytes()
            (folder / shard).write_bytes(data[:-1] if shard == corrupt else data)
        text = json.dumps({**index, "weight_map": weight_map})
        (folder / "model.safetensors.index.json").write_text(text)
        return folder

    first = next(iter(index["weight_map"]))
    moved = {
        **index["weight_map"],
        first: next(s for s in shards if s != index["weight_map"][first]),
    }
    extra = {**index["weight_map"], "not.in.any.shard": shards[0]}
    absent = {**index["weight_map"], first: "model-00099-of-00099.safetensors"}
    for folder in (
        variant("moved", moved),
        variant("extra", extra),
        variant("absent", absent),
        variant("corrupt_shard", index["weight_map"], corrupt=shards[-1]),
    ):
        assert_same_failure(folder)
    bad_json = tmp_path / "bad_index"
    bad_json.mkdir()
    (bad_json / "model.safetensors.index.json").write_text("{")
    assert_same_failure(bad_json)


# -- everything else still goes through torch --------------------------------------------


def test_dtypes_only_torch_can_judge_take_the_torch_path(tmp_path: Path) -> None:
    e8m0 = tmp_path / "e8m0.safetensors"
    save_file({"s": torch.ones(4).to(torch.float8_e8m0fnu), "w": torch.ones(2)}, str(e8m0))
    code, out, err, torch_imported = _cli("inspect", e8m0, "--json")
    assert (code, err) == (0, "") and torch_imported
    assert out == _old_json(e8m0)
    assert json.loads(out)["tensors"]["s"]["dtype"] == "float8_e8m0fnu"

    f4 = _raw(
        tmp_path / "f4.safetensors",
        b'{"x":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}',
        b"\0\0",
    )
    assert_same_failure(f4)  # valid safetensors that torch cannot hold
    assert _cli("inspect", f4)[3]


def test_torch_files_verify_and_allow_global_take_the_torch_path(
    tmp_path: Path, bert_single: Path
) -> None:
    pt = tmp_path / "w.pt"
    torch.save({"state_dict": {"a": torch.ones(3)}, "epoch": 1}, pt)
    code, out, err, torch_imported = _cli("inspect", pt, "--json")
    assert (code, err) == (0, "") and torch_imported
    assert out == _old_json(pt)

    code, out, err, torch_imported = _cli("inspect", bert_single, "--json", "--verify")
    assert (code, err) == (0, "") and torch_imported
    assert json.loads(out)["verify"]["unrecorded"] == 1
    code, _, err, torch_imported = _cli("inspect", bert_single, "--verify")
    assert code == 0 and torch_imported

    code, out, err, torch_imported = _cli(
        "inspect", bert_single, "--json", "--allow-global", "collections.OrderedDict"
    )
    assert (code, err) == (0, "") and torch_imported
    assert out == _old_json(bert_single)


# -- the pieces -----------------------------------------------------------------------


def test_header_records_match_torch_for_every_dtype_they_hold(tmp_path: Path) -> None:
    """The torch-free dtype name and item size are torch's own, dtype by dtype."""
    for st, name in TORCH_DTYPE_NAMES.items():
        dtype = safetensors_io.torch_dtype(st)
        assert (dtype_name(dtype), DTYPE_BITS[st] // 8) == (name, dtype_itemsize(dtype)), st
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(3, 5, dtype=torch.bfloat16)}, str(path))
    header = safetensors_io.read_header(str(path))
    ref = safetensors_io.open_safetensors(str(path), header)["a"]
    record = header_tensors(str(path), header)["a"]
    assert record == HeaderTensor((3, 5), "bfloat16", 2)
    assert (record.shape, record.numel, record.nbytes) == (ref.shape, ref.numel, ref.nbytes)


def test_the_inspect_modules_import_no_torch() -> None:
    modules = [
        "ckptsurgeon.cli",
        "ckptsurgeon.formats.checkpoint",
        "ckptsurgeon.formats.header_table",
        "ckptsurgeon.reporting.inspect",
    ]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
