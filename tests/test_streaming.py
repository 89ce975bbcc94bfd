"""The streaming writer: piece-by-piece copies and casts, several files through one pool.

Sizes are chosen around the writer's 1 MiB part so that first, middle and last pieces, and
tensors smaller than one piece, are all exercised; every result is compared bit for bit with
what torch itself computes.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptsurgeon.errors import InputError
from ckptsurgeon.formats import (
    open_checkpoint,
    prehash,
    safetensors_header,
    safetensors_writer,
    write_checkpoint,
)
from ckptsurgeon.formats.actions import Action
from ckptsurgeon.formats.integrity import verify_checkpoint
from ckptsurgeon.formats.table import ByteSpan

PART_ELEMS = safetensors_writer.PART // 4


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(3 * PART_ELEMS + 17, generator=gen) * 1e4,  # 3+ parts, ragged end
        "matrix": torch.randn(513, 1031, generator=gen),
        "f64": torch.randn(PART_ELEMS // 2 + 3, generator=gen, dtype=torch.float64),
        "bf16": torch.randn(PART_ELEMS + 1, generator=gen).bfloat16(),
        "half": torch.randn(7, 5, generator=gen).half(),
        "empty": torch.empty(0, 4),
        "steps": torch.arange(10),  # integers are not cast
        "specials": torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1e-40, 3.4e38]),
    }
    path = tmp_path_factory.mktemp("stream") / "src.safetensors"
    save_file(tensors, path)
    return path, tensors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_streamed_cast_equals_tensor_to(source, tmp_path: Path, dtype: torch.dtype) -> None:
    path, tensors = source
    table = open_checkpoint(path).tensors
    cast = {k: ref.cast(dtype) if ref.dtype.is_floating_point else ref for k, ref in table.items()}
    streamed = {k for k, ref in cast.items() if ref.cast_from is not None}
    assert streamed == {k for k, t in tensors.items() if t.is_floating_point() and t.dtype != dtype}
    out = tmp_path / "cast.safetensors"
    write_checkpoint(cast, str(out))
    got = load_file(out)
    for name, tensor in tensors.items():
        want = tensor.to(dtype) if tensor.is_floating_point() else tensor
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    assert {v.status for v in verify_checkpoint(open_checkpoint(out))} == {"ok"}


def test_a_cast_of_a_cast_rounds_twice_like_torch(source, tmp_path: Path) -> None:
    path, tensors = source
    ref = open_checkpoint(path).tensors["big"].cast(torch.float16).cast(torch.bfloat16)
    assert ref.cast_from is None  # only bytes in a file are streamed: this one materialises
    out = tmp_path / "twice.safetensors"
    write_checkpoint({"big": ref}, str(out))
    assert torch.equal(load_file(out)["big"], tensors["big"].half().bfloat16())


def test_reshape_of_a_cast_still_streams(source, tmp_path: Path) -> None:
    path, tensors = source
    ref = open_checkpoint(path).tensors["matrix"].cast(torch.bfloat16)
    reshaped = ref.derive(lambda t: t.reshape(1031, 513), Action("reshaped"), keeps_bytes=True)
    assert reshaped.cast_from == ref.cast_from
    out = tmp_path / "r.safetensors"
    write_checkpoint({"m": reshaped}, str(out))
    assert torch.equal(load_file(out)["m"], tensors["matrix"].bfloat16().reshape(1031, 513))


def test_many_shards_through_one_pool(source, tmp_path: Path) -> None:
    """Jobs of several files interleave; each file still gets its own tensors, in order."""
    path, tensors = source
    table = {f"{k}.{i}": ref for i in range(3) for k, ref in open_checkpoint(path).tensors.items()}
    out = tmp_path / "sharded"
    result = write_checkpoint(table, str(out), max_shard_size=2_000_000)
    assert len(result.files) > 4
    ckpt = open_checkpoint(out)
    assert {v.status for v in verify_checkpoint(ckpt)} == {"ok"}
    for name, ref in ckpt.tensors.items():
        assert torch.equal(ref.load(), tensors[name.rsplit(".", 1)[0]]), name


def _rules(rules: list[dict], table):
    from ckptsurgeon.engine.plan import run_rules
    from ckptsurgeon.rules.document import parse_rules

    return run_rules(parse_rules({"rules": rules}), table, None)[0]


def test_row_splits_and_truncations_keep_file_spans(source, tmp_path: Path) -> None:
    """Parts that are one run of the parent's bytes (rows of a fused matrix, a vocabulary
    cut short) are still copied, or cast, straight from the file; column parts are not."""
    path, tensors = source
    table = open_checkpoint(path).tensors
    rows = [{"op": "split", "pattern": "^matrix$", "into": ["q", "kv"], "sizes": [100, 413]}]
    cols = [
        {"op": "split", "pattern": "^matrix$", "dim": 1, "into": ["a", "b"], "sizes": [31, 1000]}
    ]
    cut = [{"op": "resize", "pattern": "^big$", "dim": 0, "size": PART_ELEMS + 5}]
    cast = [{"op": "cast", "dtype": "bfloat16", "pattern": "^matrix$"}]
    plain = {k: v for k, v in _rules(rows + cut, table).items() if k in ("q", "kv", "big")}
    columns = {k: v for k, v in _rules(cols, table).items() if k in ("a", "b")}
    casted = {f"{k}.bf16": v for k, v in _rules(cast + rows, table).items() if k in ("q", "kv")}
    span = table["matrix"].span
    assert plain["kv"].span == span.sub(100 * 1031 * 4, 413 * 1031 * 4)
    assert plain["kv"].span.offset == span.offset + 100 * 1031 * 4
    assert plain["big"].span.length == (PART_ELEMS + 5) * 4
    assert all(ref.span is None and ref.cast_from is None for ref in columns.values())
    assert casted["kv.bf16"].cast_from.span == plain["kv"].span
    out = tmp_path / "parts.safetensors"
    write_checkpoint({**plain, **columns, **casted}, str(out))
    got = load_file(out)
    matrix = tensors["matrix"]
    want = {
        "q": matrix[:100],
        "kv": matrix[100:],
        "big": tensors["big"][: PART_ELEMS + 5],
        "a": matrix[:, :31],
        "b": matrix[:, 31:],
        "q.bf16": matrix[:100].bfloat16(),
        "kv.bf16": matrix[100:].bfloat16(),
    }
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert {v.status for v in verify_checkpoint(open_checkpoint(out))} == {"ok"}


def test_a_negative_narrow_start_counts_from_the_end(source, tmp_path: Path) -> None:
    path, tensors = source
    ref = open_checkpoint(path).tensors["matrix"]
    parts = {
        "tail": ref.narrow(0, -13, 13, Action("tail")),
        "cast": ref.cast(torch.half).narrow(0, -2, 1, Action("c")),
    }
    assert parts["tail"].span == ref.span.sub(500 * 1031 * 4, 13 * 1031 * 4)
    out = tmp_path / "tail.safetensors"
    write_checkpoint(parts, str(out))
    got = load_file(out)
    assert torch.equal(got["tail"], tensors["matrix"][-13:])
    assert torch.equal(got["cast"], tensors["matrix"].half()[-2:-1])


def _rewrite_in_place(path: Path) -> None:
    """Rewrite ``path``'s bytes (same size, same layout). The mtime is moved on explicitly:
    the kernel's clock may not have ticked since the file was written."""
    before = os.stat(path)
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # +inf in the last float
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10_000_000))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda p: os.truncate(p, os.path.getsize(p) // 2), id="truncated"),
        pytest.param(lambda p: save_file({"other": torch.ones(3)}, p), id="replaced"),
        pytest.param(_rewrite_in_place, id="rewritten"),
        pytest.param(os.unlink, id="deleted"),
    ],
)
def test_a_source_changed_after_planning_is_an_input_error(
    source, tmp_path: Path, change: Callable[[Path], None]
) -> None:
    """Spans remember the file they were planned from: bytes of another layout are never
    copied as if they were the tensor (their digests would match, so verify could not tell)."""
    path, _ = source
    copy = tmp_path / "victim.safetensors"
    copy.write_bytes(path.read_bytes())
    table = open_checkpoint(copy).tensors
    change(copy)  # after the header was read
    for rules in (table, {k: r.cast(torch.bfloat16) for k, r in table.items()}):
        with pytest.raises(InputError, match=r"victim\.safetensors: (changed since|cannot read)"):
            write_checkpoint(rules, str(tmp_path / "out.safetensors"))
        assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(InputError, match=r"victim\.safetensors"):
        table["big"].load()


def test_metadata_changes_to_a_source_are_not_changes(source, tmp_path: Path) -> None:
    """chmod or a new hard link (backup tools, dedup caches) move the ctime, not the bytes."""
    path, tensors = source
    copy = tmp_path / "kept.safetensors"
    copy.write_bytes(path.read_bytes())
    table = open_checkpoint(copy).tensors
    os.chmod(copy, 0o444)
    os.link(copy, tmp_path / "backup.safetensors")
    write_checkpoint(table, str(tmp_path / "out.safetensors"))
    got = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


def test_a_source_changed_while_copied_is_an_input_error(source, tmp_path: Path, monkeypatch):
    """The identity is checked again once a tensor's bytes are copied."""
    path, _ = source
    copy = tmp_path / "victim.safetensors"
    copy.write_bytes(path.read_bytes())
    table = open_checkpoint(copy).tensors
    real = safetensors_writer._copy_parts

    def copy_then_touch(src: int, span: ByteSpan, fd: int, offset: int, h) -> None:
        real(src, span, fd, offset, h)
        _rewrite_in_place(copy)

    monkeypatch.setattr(safetensors_writer, "_copy_parts", copy_then_touch)
    with pytest.raises(InputError, match="changed since it was read"):
        write_checkpoint({"big": table["big"]}, str(tmp_path / "out.safetensors"))
    assert not (tmp_path / "out.safetensors").exists()


def test_memory_stays_flat_while_casting_a_large_file(tmp_path: Path) -> None:
    """A 256 MiB cast through the writer's buffers: peak RSS grows by a few MiB, not by the
    tensors' size (the old materialise-each-tensor path held ~100 MiB per worker)."""
    src = tmp_path / "big.safetensors"
    save_file({f"w{i}": torch.ones(4 << 20) for i in range(16)}, src)  # 16 x 16 MiB
    script = (
        "import resource, sys, torch\n"
        "from ckptsurgeon.formats import open_checkpoint, write_checkpoint\n"
        "t = {k: r.cast(torch.bfloat16) for k, r in open_checkpoint(sys.argv[1]).tensors.items()}\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "write_checkpoint(t, sys.argv[2], max_shard_size='40MB', durable=False)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(proc.stdout) < 32, f"peak RSS grew by {proc.stdout.strip()} MiB"


# --------------------------------------------------------------------------------------
# digests hashed ahead of time (the CLI starts them before importing torch)


def test_prehashed_digests_are_the_bytes_sha256(source) -> None:
    path, tensors = source
    digests = prehash.SourceDigests([str(path)])
    digests.wait()  # the thread has been through the file: every tensor has its digest
    header = safetensors_header.read_header(str(path))
    assert set(header.tensors) == set(tensors)
    data = path.read_bytes()
    for name, info in header.tensors.items():
        begin, end = info["data_offsets"]
        start = header.data_start + begin
        want = hashlib.sha256(data[start : header.data_start + end]).digest()
        got = digests.claim((header.file, start, end - begin))
        assert got == want, name  # never None: nothing was left for the caller to hash
    digests.stop()
    assert digests.claim((header.file, 0, 8)) is None  # never a span it hashed


def test_copies_take_prehashed_digests_instead_of_hashing(
    source, tmp_path: Path, monkeypatch
) -> None:
    path, _ = source
    digests = prehash.SourceDigests([str(path)])
    digests.wait()
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(
        safetensors_writer.hashlib, "sha256", lambda *a: hashed.append(1) or real(*a), raising=True
    )
    out = tmp_path / "out.safetensors"
    write_checkpoint(open_checkpoint(path).tensors, str(out), prehashed=digests)
    monkeypatch.undo()
    assert len(hashed) == 1  # the file's content digest only: no tensor hashed again
    assert {v.status for v in verify_checkpoint(open_checkpoint(out))} == {"ok"}


def test_prehashed_copies_are_kernel_copies_at_source_page_offsets(
    tmp_path: Path, monkeypatch
) -> None:
    """The header is padded so copied bytes keep their offset modulo the page size (the
    kernel's copy runs at full speed only then); the padding is valid safetensors."""
    path = tmp_path / "src.safetensors"
    tensors = {f"w{i}": torch.randn(1000 * i + 3) for i in range(1, 6)}  # ragged offsets
    save_file(tensors, path)
    digests = prehash.SourceDigests([str(path)])
    digests.wait()
    calls: list[tuple[int, int]] = []
    real = os.copy_file_range

    def spy(src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
        calls.append((offset_src, offset_dst))
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(safetensors_writer.os, "copy_file_range", spy)
    table = {"renamed." + k: ref for k, ref in open_checkpoint(path).tensors.items()}
    out = tmp_path / "out.safetensors"
    write_checkpoint(table, str(out), prehashed=digests)
    monkeypatch.undo()
    assert len(calls) == len(tensors)
    assert all((s - d) % mmap.PAGESIZE == 0 for s, d in calls)
    starts = [safetensors_header.read_header(str(p)).data_start for p in (path, out)]
    assert starts[1] % 8 == 0 and (starts[1] - starts[0]) % mmap.PAGESIZE == 0
    got = load_file(out)  # the reference reader accepts the padded header
    assert all(torch.equal(got["renamed." + k], v) for k, v in tensors.items())
    assert {v.status for v in verify_checkpoint(open_checkpoint(out))} == {"ok"}


@pytest.mark.parametrize("refusal", [errno.EXDEV, errno.EPERM, errno.ENOSYS, 0])
def test_copies_fall_back_when_the_kernel_cannot_copy(
    source, tmp_path: Path, monkeypatch, refusal: int
) -> None:
    """As ``cp`` does: these errors, or nothing copied at all, mean "copy another way"."""
    path, tensors = source
    digests = prehash.SourceDigests([str(path)])
    digests.wait()

    def refuse(*_: int) -> int:
        if refusal:
            raise OSError(refusal, os.strerror(refusal))
        return 0

    monkeypatch.setattr(safetensors_writer.os, "copy_file_range", refuse)
    out = tmp_path / "out.safetensors"
    write_checkpoint(open_checkpoint(path).tensors, str(out), prehashed=digests)
    monkeypatch.undo()
    got = load_file(out)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    assert {v.status for v in verify_checkpoint(open_checkpoint(out))} == {"ok"}


def test_a_kernel_copy_past_the_end_of_the_source_is_an_input_error(source, tmp_path: Path) -> None:
    path, _ = source
    size = os.path.getsize(path)
    with open(path, "rb") as src, open(tmp_path / "out", "wb") as out:
        span = ByteSpan(str(path), size - 10, 20)
        with pytest.raises(InputError, match="file ended early"):
            safetensors_writer._kernel_copy(src.fileno(), span, out.fileno(), 0)


def test_a_file_changed_after_prehashing_is_hashed_again(source, tmp_path: Path) -> None:
    """Digests are keyed by the file's identity: new bytes under the same name are hashed
    by the writer, and the output's records match what it holds."""
    path, tensors = source
    copy = tmp_path / "changing.safetensors"
    copy.write_bytes(path.read_bytes())
    digests = prehash.SourceDigests([str(copy)])
    digests.stop()
    changed = {k: (v + 1 if v.is_floating_point() else v) for k, v in tensors.items()}
    save_file(changed, copy)
    os.utime(copy, ns=(1, 1))  # a different mtime even on coarse clocks
    out = tmp_path / "out.safetensors"
    write_checkpoint(open_checkpoint(copy).tensors, str(out), prehashed=digests)
    assert {v.status for v in verify_checkpoint(open_checkpoint(out))} == {"ok"}
    assert torch.equal(load_file(out)["big"], changed["big"])


@pytest.mark.parametrize("command", ["apply", "convert"])
def test_cli_hashes_a_safetensors_source_ahead(tmp_path: Path, monkeypatch, command: str) -> None:
    """``apply`` and ``convert`` hash the source while starting up; copies take those
    digests, and the sharded output verifies."""
    from click.testing import CliRunner
    from huggingface_hub import save_torch_state_dict

    from ckptsurgeon.cli import cli

    table = {f"layer{i}.weight": torch.full((256, 256), float(i)) for i in range(12)}
    (tmp_path / "src").mkdir()
    save_torch_state_dict(table, tmp_path / "src", max_shard_size=1_000_000)
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 2
    taken: list[bytes] = []
    claim = prehash.SourceDigests.claim

    def spy(self: prehash.SourceDigests, key: prehash.SpanKey) -> bytes | None:
        digest = claim(self, key)
        taken.extend([digest] if digest is not None else [])
        return digest

    monkeypatch.setattr(prehash.SourceDigests, "claim", spy)
    monkeypatch.setattr(prehash.SourceDigests, "start", _started_and_finished)
    if command == "apply":
        rules = tmp_path / "rules.yaml"
        rules.write_text(
            "version: 1\nsource: src\noutput: {path: out, max_shard_size: 600000}\n"
            "rules:\n  - {op: rename, pattern: '^', replace: 'model.'}\n"
        )
        argv = ["apply", str(rules), "--quiet"]
        prefix = "model."
    else:
        out = tmp_path / "out"
        argv = ["convert", str(tmp_path / "src"), str(out), "--max-shard-size", "600000", "-q"]
        prefix = ""
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0, result.output
    assert len(taken) == len(table)
    ckpt = open_checkpoint(tmp_path / "out")
    assert {v.status for v in verify_checkpoint(ckpt)} == {"ok"}
    assert all(torch.equal(ckpt.tensors[prefix + k].load(), v) for k, v in table.items())


def _started_and_finished(source: str) -> prehash.SourceDigests | None:
    """``SourceDigests.start`` that lets the thread finish, so the test is deterministic."""
    files = prehash.safetensors_files(source)
    digests = prehash.SourceDigests(files) if files else None
    if digests is not None:
        digests.wait()
    return digests


def test_prehash_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom ckptsurgeon.formats import prehash\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
