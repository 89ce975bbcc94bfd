"""Integrity: every safetensors output records sha256 digests; ``inspect --verify`` checks them.

A single file records its content digest and each tensor's digest in ``__metadata__``; a
sharded folder's index records each shard's digest as well. ``inspect --verify`` recomputes
them: 0 when they match, 3 naming the file and the tensor (with its byte range) when a byte
changed, and a plain "not verified" when nothing was recorded. torch zip files are checked
against their per-record CRC-32, which ``torch.load`` ignores.
"""

from __future__ import annotations

import json
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_clean_failure, assert_same_tensors, materialise

from ckptsurgeon.cli import cli
from ckptsurgeon.formats import open_checkpoint, safetensors_io, write_checkpoint
from ckptsurgeon.formats.integrity import verify_checkpoint
from ckptsurgeon.formats.table import cast_floating, from_tensor

DIGEST = safetensors_io.DIGEST_KEY
TENSORS = safetensors_io.TENSOR_DIGESTS_KEY
INDEX = "model.safetensors.index.json"


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(64, 16, generator=g),
        "layers.0.weight": torch.randn(16, 16, generator=g),
        "layers.0.bias": torch.randn(16, generator=g),
        "head.weight": torch.randn(10, 16, generator=g).to(torch.bfloat16),
        "step": torch.tensor(7),
        "empty": torch.empty(0, 4),
    }


def _table(state: dict[str, torch.Tensor]):
    return {name: from_tensor(t, name) for name, t in state.items()}


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    argv = [str(a) for a in args]
    result = CliRunner().invoke(cli, argv)
    return subprocess.CompletedProcess(argv, result.exit_code, result.stdout, result.stderr)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _tensor_offset(path: Path, name: str) -> int:
    """Absolute offset of the first byte of tensor ``name`` in a safetensors file."""
    header = safetensors_io.read_header(str(path))
    return header.data_start + header.tensors[name]["data_offsets"][0]


# --------------------------------------------------------------------------------------
# what is recorded


@pytest.mark.parametrize("via", ["materialised", "copied"])
def test_single_file_records_its_digests(tmp_path: Path, via: str) -> None:
    """Both write paths (tensors built in memory, bytes copied file-to-file) record the
    same digests, and the file stays a plain safetensors file for every other reader."""
    from safetensors.torch import load_file

    first = tmp_path / "first.safetensors"
    write_checkpoint(_table(_state()), str(first))
    out = first
    if via == "copied":
        out = tmp_path / "copied.safetensors"
        write_checkpoint(open_checkpoint(first).tensors, str(out))
    header = safetensors_io.read_header(str(out))
    assert len(header.metadata[DIGEST]) == 64
    assert len(header.metadata[TENSORS]) == 64 * len(_state())
    assert_same_tensors(load_file(out), _state())  # the reference reader is unbothered
    assert verify_checkpoint(open_checkpoint(out))[0].status == "ok"
    if via == "copied":  # same tensors, same digests, whichever way the bytes travelled
        assert safetensors_io.read_header(str(first)).metadata[DIGEST] == header.metadata[DIGEST]


def test_digest_covers_every_tensor_byte_and_entry(tmp_path: Path) -> None:
    """Recomputed by hand from the definition in content_digest: sha256 of each tensor's
    bytes in data order, after the (name, dtype, shape, offsets) table."""
    import hashlib

    path = tmp_path / "m.safetensors"
    write_checkpoint(_table(_state()), str(path))
    header = safetensors_io.read_header(str(path))
    raw = path.read_bytes()
    entries = sorted(header.tensors.items(), key=lambda kv: kv[1]["data_offsets"][0])
    digests = [
        hashlib.sha256(raw[header.data_start + e["data_offsets"][0] :][: e["data_offsets"][1] - e["data_offsets"][0]]).digest()
        for _, e in entries
    ]  # fmt: skip
    assert "".join(d.hex() for d in digests) == header.metadata[TENSORS]
    assert safetensors_io.content_digest(entries, digests) == header.metadata[DIGEST]


def test_sharded_index_records_each_shard(tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    write_checkpoint(_table(_state()), str(out), max_shard_size=2000)
    index = json.loads((out / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in _state().values())
    assert sorted(index["metadata"][DIGEST]) == shards
    for shard in shards:
        recorded = safetensors_io.read_header(str(out / shard)).metadata[DIGEST]
        assert index["metadata"][DIGEST][shard] == recorded
    verdicts = verify_checkpoint(open_checkpoint(out))
    assert [v.status for v in verdicts] == ["ok"] * len(shards)


def test_same_table_gives_the_same_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_checkpoint(_table(_state()), str(a))
    write_checkpoint(_table(_state()), str(b))
    assert a.read_bytes() == b.read_bytes()


# --------------------------------------------------------------------------------------
# inspect --verify


def test_verify_passes_on_intact_outputs(tmp_path: Path) -> None:
    single = tmp_path / "m.safetensors"
    sharded = tmp_path / "sharded"
    write_checkpoint(_table(_state()), str(single))
    write_checkpoint(_table(_state()), str(sharded), max_shard_size=2000)
    for path in (single, sharded, sharded / INDEX):
        proc = _cli("inspect", path, "--verify")
        assert proc.returncode == 0, proc.stderr
        assert "verified" in proc.stdout and "NOT verified" not in proc.stdout
        report = json.loads(_cli("inspect", path, "--verify", "--json").stdout)["verify"]
        assert report["ok"] and report["unrecorded"] == 0 and report["verified"] >= 1


def test_flipped_data_byte_is_caught_and_named(tmp_path: Path) -> None:
    """A flipped bit in tensor data: both readers load the file without a word; verify
    exits 3 naming the file, the tensor and its byte range."""
    from safetensors.torch import load_file

    path = tmp_path / "m.safetensors"
    write_checkpoint(_table(_state()), str(path))
    at = _tensor_offset(path, "layers.0.weight") + 5
    _flip(path, at)
    loaded = load_file(path)  # the reference reader: no error, silently different weights
    assert not torch.equal(loaded["layers.0.weight"], _state()["layers.0.weight"])
    materialise(open_checkpoint(path).tensors)  # reading is not verifying
    proc = _cli("inspect", path, "--verify")
    assert_clean_failure(proc, 3, str(path), "'layers.0.weight'", "corrupt data")
    begin = _tensor_offset(path, "layers.0.weight")
    assert f"bytes {begin}..{begin + 16 * 16 * 4}" in proc.stderr
    assert "embed.weight" not in proc.stderr  # only what changed is named


def test_flipped_byte_in_a_shard_is_caught(tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    write_checkpoint(_table(_state()), str(out), max_shard_size=2000)
    index = json.loads((out / INDEX).read_text())
    shard = out / index["weight_map"]["layers.0.bias"]
    _flip(shard, _tensor_offset(shard, "layers.0.bias"))
    proc = _cli("inspect", out, "--verify")
    assert_clean_failure(proc, 3, shard.name, "'layers.0.bias'")
    assert "index records" in proc.stderr


def test_header_tampering_is_caught(tmp_path: Path) -> None:
    """Same length, still a valid header: F32 relabelled I32. Data digests all match, so
    the content digest (which covers every entry) is what catches it."""
    path = tmp_path / "m.safetensors"
    write_checkpoint(_table(_state()), str(path))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + n].replace(b'"F32"', b'"I32"', 1)
    path.write_bytes(raw[:8] + header + raw[8 + n :])
    open_checkpoint(path)  # still a well-formed file
    assert_clean_failure(_cli("inspect", path, "--verify"), 3, "header or its records were changed")


def test_index_recording_a_wrong_digest_is_caught(tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    write_checkpoint(_table(_state()), str(out), max_shard_size=2000)
    index = json.loads((out / INDEX).read_text())
    first = sorted(index["metadata"][DIGEST])[0]
    index["metadata"][DIGEST][first] = "0" * 64
    (out / INDEX).write_text(json.dumps(index))
    assert_clean_failure(
        _cli("inspect", out, "--verify"), 3, first, "does not match the sha256 the index records"
    )


def test_files_without_records_are_reported_not_verified(tmp_path: Path) -> None:
    """A file from another tool has nothing to check against: exit 0, said plainly."""
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file(_state(), path)
    proc = _cli("inspect", path, "--verify")
    assert proc.returncode == 0, proc.stderr
    assert "NOT verified" in proc.stdout and "no recorded sha256" in proc.stdout
    report = json.loads(_cli("inspect", path, "--verify", "--json").stdout)["verify"]
    assert report == {
        "ok": True,
        "verified": 0,
        "unrecorded": 1,
        "files": [
            {
                "path": str(path),
                "status": "unrecorded",
                "detail": "no recorded sha256 (not written by ckptsurgeon?)",
                "digest": None,
            }
        ],
    }
    legacy = tmp_path / "legacy.pt"
    torch.save(_state(), legacy, _use_new_zipfile_serialization=False)
    proc = _cli("inspect", legacy, "--verify")
    assert proc.returncode == 0 and "NOT verified" in proc.stdout and "no checksums" in proc.stdout


def test_cast_outputs_are_recorded_too(tmp_path: Path) -> None:
    source = tmp_path / "src.safetensors"
    write_checkpoint(_table(_state()), str(source))
    out = tmp_path / "bf16.safetensors"
    write_checkpoint(cast_floating(open_checkpoint(source).tensors, torch.bfloat16), str(out))
    assert verify_checkpoint(open_checkpoint(out))[0].status == "ok"


def test_torch_zip_crc_catches_what_torch_load_does_not(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save(_state(), path)
    assert _cli("inspect", path, "--verify").returncode == 0
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 100)
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    _flip(path, info.header_offset + 30 + name_len + extra_len + 3)
    torch.load(path, weights_only=True)  # torch: no error, silently different weights
    assert_clean_failure(_cli("inspect", path, "--verify"), 3, info.filename, "CRC-32")


def test_cli_verify_as_a_user_runs_it(tmp_path: Path, run_cli) -> None:
    """The real command on a corrupt shard (converting and the passing verify run in
    process above and here; each real command costs seconds of torch import)."""
    source = tmp_path / "src.pt"
    torch.save(_state(), source)
    out = tmp_path / "out"
    assert _cli("convert", source, out, "--max-shard-size", "2KB").returncode == 0
    ok = _cli("inspect", out, "--verify")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("verified ") >= 2
    index = json.loads((out / INDEX).read_text())
    shard = out / index["weight_map"]["embed.weight"]
    _flip(shard, _tensor_offset(shard, "embed.weight") + 100)
    bad = run_cli("inspect", out, "--verify")
    assert_clean_failure(bad, 3, shard.name, "'embed.weight'")
    assert len([line for line in bad.stderr.splitlines() if line.strip()]) == 1
