"""DeepSpeed ZeRO folders (stages 1, 2, 3), saved by DeepSpeed itself under torchrun, read
without DeepSpeed: compared bit for bit with DeepSpeed's own ``zero_to_fp32``."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_clean_failure, assert_same_tensors, materialise
from safetensors.torch import load_file

from ckptsurgeon.errors import InputError, UnsafeInputError
from ckptsurgeon.formats import detect_format, open_checkpoint

pytest.importorskip("deepspeed")

FOLDERS = ("zero1", "zero2", "zero3", "zero2_bf16", "zero3_bf16")
TAG = "global_step2"
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")


@pytest.fixture(scope="session")
def saved(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """Every folder in FOLDERS, saved by two ranks, and ``<folder>.reference.pt`` beside
    each: what ``get_fp32_state_dict_from_zero_checkpoint`` returns for it. Made once per
    test session (xdist workers share it, the first one makes it)."""
    base = tmp_path_factory.getbasetemp()
    root = (base if worker_id == "master" else base.parent) / "zero_checkpoints"
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            script = REPO / "tests" / "zero_save.py"
            stages = ["--stages", "1", "2", "3", "--bf16-stages", "2", "3", "--reference"]
            proc = subprocess.run(
                [*TORCHRUN, str(script), str(root), *stages],
                capture_output=True,
                text=True,
                timeout=600,
                env={**os.environ, "DS_ACCELERATOR": "cpu"},
            )
            assert proc.returncode == 0, proc.stderr[-4000:]
            (root / "done").touch()
    return root


def _copy(saved: Path, folder: str, tmp_path: Path) -> Path:
    dest = tmp_path / folder
    shutil.copytree(saved / folder, dest)
    return dest


def _reference(saved: Path, folder: str) -> dict[str, torch.Tensor]:
    return torch.load(saved / f"{folder}.reference.pt", weights_only=True)


@pytest.mark.parametrize("folder", FOLDERS)
def test_same_as_zero_to_fp32_bit_for_bit(saved: Path, folder: str) -> None:
    ckpt = open_checkpoint(saved / folder)
    reference = _reference(saved, folder)
    ours = materialise(ckpt.tensors)
    assert list(ours) == list(reference)  # the same names in the same order
    assert_same_tensors(ours, reference)
    stage = folder[4]
    assert ckpt.format == detect_format(str(saved / folder)) == f"deepspeed-zero{stage}"
    assert ckpt.metadata["zero_stage"] == stage
    assert ckpt.metadata["world_size"] == "2"
    assert ckpt.metadata["tag"] == TAG
    assert ckpt.metadata["weights_from"] == "optimizer fp32 master weights"
    assert ckpt.aliases == {"head.weight": "embed.weight"}
    # what the test model holds, so the comparison covers every kind of entry
    assert reference["position"].dtype == torch.int64  # an integer buffer, kept as it is
    assert ("frozen.weight" in reference) == (stage != "1")  # ZeRO-1 saves no frozen params
    if folder.endswith("bf16"):
        assert reference["frozen.weight"].dtype == torch.bfloat16  # frozen: as trained
        assert reference["scale"].dtype == torch.float32  # floating buffers: fp32


def test_tag_folder_reads_the_same(saved: Path) -> None:
    whole = materialise(open_checkpoint(saved / "zero3").tensors)
    assert_same_tensors(materialise(open_checkpoint(saved / "zero3" / TAG).tensors), whole)


def test_zero2_parameters_in_one_rank_copy_straight_from_disk(saved: Path) -> None:
    """A stage 1/2 parameter inside one rank's partition is one run of bytes there."""
    ckpt = open_checkpoint(saved / "zero2")
    table = ckpt.tensors
    spans = {n: r.span for n, r in table.items() if r.span is not None}
    assert "embed.weight" in spans and "proj.weight" in spans
    assert "body.0.weight" not in spans  # split between rank 0 and rank 1
    assert spans["proj.weight"].path.endswith("zero_pp_rank_1_mp_rank_00_optim_states.pt")


def test_reads_and_converts_where_deepspeed_cannot_be_imported(
    saved: Path, tmp_path: Path, run_cli
) -> None:
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        textwrap.dedent(
            """\
            import sys

            class _NoDeepSpeed:
                def find_spec(self, name, path=None, target=None):
                    if name == "deepspeed" or name.startswith("deepspeed."):
                        raise ImportError("deepspeed is blocked in this test")
                    return None

            sys.meta_path.insert(0, _NoDeepSpeed())
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{REPO}"}
    check = subprocess.run(
        [sys.executable, "-c", "import deepspeed"], capture_output=True, text=True, env=env
    )
    assert check.returncode != 0 and "blocked" in check.stderr  # the blocker works
    folder = saved / "zero3"
    out = tmp_path / "out.safetensors"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ckptsurgeon", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    proc = cli("inspect", "--json", str(folder))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["format"] == "deepspeed-zero3"
    assert summary["metadata"]["world_size"] == "2"
    assert summary["metadata"]["weights_from"] == "optimizer fp32 master weights"
    assert "ZeRO-3" in summary["note"]
    proc = cli("convert", "-q", str(folder), str(out))
    assert proc.returncode == 0, proc.stderr
    written = load_file(out)
    reference = _reference(saved, "zero3")
    assert sorted(written) == sorted(reference)
    assert_same_tensors(written, {n: reference[n] for n in written})


def test_apply_rules_to_a_zero_folder(saved: Path, tmp_path: Path, run_cli) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"version: 1\nsource: {saved / 'zero2_bf16'}\noutput: out.safetensors\n"
        "rules:\n  - op: drop\n    pattern: '^position$'\n"
        "  - op: add_prefix\n    prefix: 'model.'\n"
    )
    proc = run_cli("apply", "-q", str(rules))
    assert proc.returncode == 0, proc.stderr
    written = load_file(tmp_path / "out.safetensors")
    reference = _reference(saved, "zero2_bf16")
    expected = {f"model.{n}": t for n, t in reference.items() if n != "position"}
    assert sorted(written) == sorted(expected)
    assert_same_tensors(written, {n: expected[n] for n in written})


def test_module_weights_without_optimizer_files(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, "zero2_bf16", tmp_path)
    for file in (folder / TAG).glob("*_optim_states.pt"):
        file.unlink()
    ckpt = open_checkpoint(folder)
    assert ckpt.format == "deepspeed-zero2"  # from the saved DeepSpeed config
    assert ckpt.metadata["weights_from"] == "module weights"
    assert "not the fp32 master weights" in ckpt.note
    module = torch.load(folder / TAG / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert_same_tensors(materialise(ckpt.tensors), dict(module))
    assert ckpt.tensors["embed.weight"].dtype == torch.bfloat16  # as trained
    assert ckpt.aliases == {"head.weight": "embed.weight"}


def test_zero3_without_optimizer_files_is_refused(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, "zero3", tmp_path)
    for file in (folder / TAG).glob("*_optim_states.pt"):
        file.unlink()
    with pytest.raises(InputError, match=r"partitioned; the \*_optim_states\.pt files are needed"):
        open_checkpoint(folder)


def _forged_optim(path: Path, partition_count: int, numel: int) -> None:
    """A rank file as ZeRO-3 saves it, with plain values where DeepSpeed has its classes."""
    state = {"zero_stage": 3, "partition_count": partition_count}
    state["fp32_flat_groups"] = [torch.zeros(numel)]
    torch.save({"optimizer_state_dict": state}, path)


def _rank(folder: Path, rank: int, kind: str) -> Path:
    return folder / TAG / f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt"


def _remove_rank_optim(folder: Path) -> str:
    _rank(folder, 1, "optim").unlink()
    return "zero_pp_rank_1_mp_rank_00_optim_states.pt: missing"


def _remove_rank_model(folder: Path) -> str:
    _rank(folder, 1, "model").unlink()
    return "zero_pp_rank_1_mp_rank_00_model_states.pt: missing"


def _other_world_size(folder: Path) -> str:
    _forged_optim(_rank(folder, 1, "optim"), partition_count=3, numel=226)
    return "partition_count gives world size 3"


def _other_param_shapes(folder: Path) -> str:
    path = _rank(folder, 1, "model")
    state = torch.load(path, weights_only=True)
    state["param_shapes"][0]["embed.weight"] = torch.Size([38, 6])
    torch.save(state, path)
    return "its param shapes differ"


def _truncated_flat_groups(folder: Path) -> str:
    for rank in (0, 1):
        _forged_optim(_rank(folder, rank, "optim"), partition_count=2, numel=200)
    return "param shapes need"


def _truncated_file(folder: Path) -> str:
    path = _rank(folder, 1, "optim")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "corrupt or truncated"


def _latest_outside(folder: Path) -> str:
    (folder / "latest").write_text("../../etc")
    return "is not the name of a folder inside"


def _no_such_tag(folder: Path) -> str:
    (folder / "latest").write_text("global_step9")
    return "names tag 'global_step9', but there is no folder"


BAD = [
    _remove_rank_optim,
    _remove_rank_model,
    _other_world_size,
    _other_param_shapes,
    _truncated_flat_groups,
    _truncated_file,
    _latest_outside,
    _no_such_tag,
]


@pytest.mark.parametrize("spoil", BAD, ids=lambda f: f.__name__.strip("_"))
def test_bad_folders_are_refused_with_one_message(saved: Path, tmp_path: Path, spoil) -> None:
    folder = _copy(saved, "zero3", tmp_path)
    needle = spoil(folder)
    with pytest.raises(InputError) as caught:
        ckpt = open_checkpoint(folder)
        materialise(ckpt.tensors)
    message = str(caught.value)
    assert needle in message, message
    assert "\n" not in message
    assert str(folder) in message  # names the file or folder


def test_bad_folder_cli_exit_3_and_nothing_written(saved: Path, tmp_path: Path, run_cli) -> None:
    folder = _copy(saved, "zero3", tmp_path)
    needle = _latest_outside(folder)
    out = tmp_path / "out.safetensors"
    assert_clean_failure(run_cli("convert", str(folder), str(out)), 3, needle)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zero3"]


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_rank_file_is_refused_and_never_runs(
    saved: Path, tmp_path: Path, run_cli
) -> None:
    folder = _copy(saved, "zero3", tmp_path)
    marker = tmp_path / "pwned"
    path = _rank(folder, 0, "optim")
    torch.save({"optimizer_state_dict": {"zero_stage": _Payload(marker)}}, path)
    with pytest.raises(UnsafeInputError, match="system"):
        open_checkpoint(folder)
    out = tmp_path / "out.safetensors"
    proc = run_cli("convert", str(folder), str(out))
    assert_clean_failure(proc, 3, "refusing to load", "system", str(path))
    assert not marker.exists() and not out.exists()
