"""Several processes: DCP checkpoints that a real two-process FSDP2 (``fully_shard``) model
saved, read as whole tensors; DCP outputs loaded back, resharded, into FSDP2 models; and
``apply`` under torchrun (rank 0 writes, every rank fine-tunes; a failure fails them all).

Every multi-process run is a subprocess with a timeout, on the CPU with gloo; the FSDP2
checkpoints are made once per module (tests/fsdp2_torchrun.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_same_tensors, materialise
from safetensors.torch import load_file, save_file

from ckptsurgeon.api import convert
from ckptsurgeon.formats import open_checkpoint
from ckptsurgeon.reporting.inspect import summarize

SCRIPT = Path(__file__).resolve().parent / "fsdp2_torchrun.py"
TIMEOUT = 240
KINDS = ["plain", "mixed"]


def torchrun(*args: str | os.PathLike, log_dir: Path | None = None, cwd: Path | None = None):
    """``torchrun --standalone --nproc-per-node 2 ARGS``; with ``log_dir`` each rank's
    stdout and stderr go to their own files there."""
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.run(
        [*command, "--nproc-per-node", "2", *logs, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def rank_logs(log_dir: Path, rank: int) -> str:
    """What one rank printed (stdout then stderr), from torchrun's per-rank log files."""
    files = sorted(log_dir.glob(f"*/attempt_0/{rank}/std*.log"), key=lambda p: p.name, reverse=True)
    assert files, list(log_dir.rglob("*"))
    return "".join(f.read_text() for f in files)


@pytest.fixture(scope="module")
def fsdp2_saves(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``plain/`` and ``mixed/``: each a DCP folder saved by both ranks (``dcp/``) and the
    gathered full state dict as reference (``full.pt``)."""
    out = tmp_path_factory.mktemp("fsdp2")
    proc = torchrun(SCRIPT, "save", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_a_sharded_fsdp2_save_reads_as_the_full_state_dict(
    run_cli, fsdp2_saves: Path, tmp_path: Path, kind: str
) -> None:
    saved = fsdp2_saves / kind
    full = torch.load(saved / "full.pt", weights_only=True)
    data = [n for n in os.listdir(saved / "dcp") if n.endswith(".distcp")]
    assert sorted(data) == ["__0_0.distcp", "__1_0.distcp"]  # both ranks wrote shards
    summary = summarize(open_checkpoint(str(saved / "dcp")))  # what inspect --json prints
    assert summary["format"] == "dcp"
    assert summary["tensors"] == {
        name: {"shape": list(t.shape), "dtype": "float32", "bytes": t.nbytes}
        for name, t in full.items()
    }
    proc = run_cli("convert", saved / "dcp", tmp_path / "full.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(load_file(tmp_path / "full.safetensors"), full)


def test_the_two_saves_differ_where_the_frozen_part_did_not_train(fsdp2_saves: Path) -> None:
    plain = torch.load(fsdp2_saves / "plain" / "full.pt", weights_only=True)
    mixed = torch.load(fsdp2_saves / "mixed" / "full.pt", weights_only=True)
    assert not torch.equal(plain["0.0.weight"], mixed["0.0.weight"])  # frozen in mixed
    torch.manual_seed(0)
    init = torch.nn.Linear(12, 7)  # the first layer as build() seeds it
    assert torch.equal(mixed["0.0.weight"], init.weight.detach())


def test_dcp_outputs_load_resharded_into_fsdp2_models(fsdp2_saves: Path, tmp_path: Path) -> None:
    """ckptsurgeon's DCP outputs, in several data files, load with dcp.load into
    two-process FSDP2 models; each rank checks its shards. One is written from safetensors
    here; the other from a torch file by api.convert inside the two-process program itself
    (its group exists: rank 0 writes, the other rank waits for it)."""
    plain, mixed = (fsdp2_saves / kind / "full.pt" for kind in KINDS)
    save_file(torch.load(mixed, weights_only=True), tmp_path / "mixed.safetensors")
    convert(
        str(tmp_path / "mixed.safetensors"),
        str(tmp_path / "mixed_dcp"),
        format="dcp",
        max_shard_size="200B",
    )
    plain_dcp = tmp_path / "plain_dcp"
    proc = torchrun(
        SCRIPT, "convert", plain, plain_dcp,
        "+", "load", plain_dcp, plain, "plain",
        "+", "load", tmp_path / "mixed_dcp", mixed, "mixed",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"rank 0 wrote 5 files to {plain_dcp}") == 2, proc.stdout
    for rank in (0, 1):
        assert proc.stdout.count(f"rank {rank}: 8 tensors") == 2, proc.stdout
    # Files of at most 200 B filled in table order (a larger tensor alone): the torch
    # file keeps the model's order, [336] [28 140 20] [60 12 12 12]; safetensors sorts
    # names, [28] [336] [20 140 12] [60 12 12].
    for out, files in ((plain_dcp, 3), (tmp_path / "mixed_dcp", 4)):
        assert len([n for n in os.listdir(out) if n.endswith(".distcp")]) == files
    # The check can fail: the plain reference does not match the mixed model's save.
    proc = torchrun(SCRIPT, "load", tmp_path / "mixed_dcp", plain, "mixed")
    assert proc.returncode != 0 and "differs from the reference" in proc.stderr


# -- apply under torchrun -----------------------------------------------------------------


def _finetune_rules(folder: Path, first_rule: str = "{op: strip_prefix, prefix: module.}") -> Path:
    sys.path.insert(0, str(REPO / "rules"))
    from models import digits_cnn

    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in digits_cnn(2).state_dict().items()}
    torch.save({"model": state}, folder / "init.pt")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=gen)
    save_file({"x": x, "y": (x.mean(dim=(1, 2, 3)) > 0).long()}, folder / "train.safetensors")
    rules = folder / "rules.yaml"
    rules.write_text(
        f"""\
version: 1
source: {{path: init.pt, key: model}}
target: {{model: {REPO / "rules" / "models.py"}:digits_cnn, kwargs: {{num_classes: 2}}}}
output: {{path: out/init_dcp, format: dcp}}
rules:
  - {first_rule}
finetune:
  data: {{train: {{tensors: train.safetensors}}}}
  phases: [{{epochs: 1, frozen: false, lr: 0.01}}]
  batch_size: 8
  cache_features: false
  output_dir: run
"""
    )
    return rules


def test_apply_under_torchrun_writes_on_rank_0_and_trains_on_both(tmp_path: Path) -> None:
    rules = _finetune_rules(tmp_path)
    logs = tmp_path / "logs"
    proc = torchrun(
        "-m", "ckptsurgeon", "apply", rules, "--report", "report.json", log_dir=logs, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = rank_logs(logs, 0), rank_logs(logs, 1)
    assert rank0.count("wrote ") == 1 and "loads strictly" in rank0 and "epoch 1" in rank0
    assert rank1 == "", rank1  # rank 1 neither planned, wrote, reported nor logged
    out = tmp_path / "out" / "init_dcp"
    assert sorted(os.listdir(out)) == [".metadata", "__0_0.distcp", "ckptsurgeon.json"]
    assert not [n for n in os.listdir(out.parent) if ".ckptsurgeon-tmp-" in n]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["written"]["path"] == str(out)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 1  # DDP over both ranks
    source = torch.load(tmp_path / "init.pt", weights_only=True)["model"]
    written = materialise(open_checkpoint(str(out)).tensors)
    assert_same_tensors(written, {k.removeprefix("module."): v for k, v in source.items()})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_failure_on_rank_0_fails_every_rank_with_its_exit_code(tmp_path: Path) -> None:
    """Two ranks started as torchrun starts them (its environment), so each one's exit
    code and message can be read: rank 0's rule matches nothing (exit 1), and rank 1,
    waiting for it, exits 1 too instead of waiting forever."""
    rules = _finetune_rules(tmp_path, "{op: strip_prefix, prefix: nothing.}")
    port = str(_free_port())
    started = time.monotonic()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "ckptsurgeon", "apply", str(rules), "--json"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [p.communicate(timeout=TIMEOUT) for p in procs]
    assert time.monotonic() - started < TIMEOUT
    (out0, err0), (out1, err1) = results
    assert [p.returncode for p in procs] == [1, 1], (err0, err1)
    assert "matched no key" in err0, err0
    assert "rank 0 failed (exit 1)" in err1 and "Traceback" not in err1, err1
    assert json.loads(out0)["error"]["exit_code"] == 1 and out1 == ""  # one JSON object
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()

    # the same under torchrun itself: it ends, non-zero, well within the timeout
    proc = torchrun("-m", "ckptsurgeon", "apply", rules, cwd=tmp_path)
    assert proc.returncode != 0
    assert not (tmp_path / "out").exists()
