"""Fine-tune runner benchmarks, each printed as a table measured side by side in one run.

python benchmarks/bench_finetune.py transfer   # (a) transfer vs scratch on sklearn digits
python benchmarks/bench_finetune.py overhead   # (b) runner vs a hand-written loop
python benchmarks/bench_finetune.py cache      # (c) cached vs uncached frozen resnet18 epochs
python benchmarks/bench_finetune.py all
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "rules"))
sys.path.insert(0, str(REPO / "examples"))

from make_checkpoints import digits_split, pretrain_digits  # noqa: E402
from models import digits_cnn  # noqa: E402

import ckptsurgeon  # noqa: E402
from ckptsurgeon.finetune.runner import run_finetune  # noqa: E402
from ckptsurgeon.rules.finetune import FinetuneSpec  # noqa: E402


def quiet(*_args) -> None:
    pass


def transfer(draws: int = 3, shots: tuple[int, ...] = (5, 10, 30)) -> None:
    """(a) Pretrain on half A (10 classes); new task on half B: parity, k examples per class."""
    x_a, y_a, x_b, y_b = digits_split()
    work = Path(tempfile.mkdtemp(prefix="ckptsurgeon-transfer-"))
    torch.save({"model": pretrain_digits(x_a, y_a).state_dict()}, work / "pretrained.pt")
    label = y_b % 2
    print("| examples per class | transfer: frozen backbone (val acc) | scratch (val acc) |")
    print("|---|---|---|")
    for k in shots:
        results = {"transfer": [], "scratch": []}
        for draw in range(draws):
            gen = torch.Generator().manual_seed(1000 * k + draw)
            picks = torch.cat(
                [
                    torch.nonzero(label == c).flatten()[
                        torch.randperm(int((label == c).sum()), generator=gen)[:k]
                    ]
                    for c in (0, 1)
                ]
            )
            rest = torch.ones(len(label), dtype=torch.bool)
            rest[picks] = False
            save_file(
                {"x": x_b[picks].contiguous(), "y": label[picks].contiguous()},
                work / "train.safetensors",
            )
            save_file(
                {"x": x_b[rest].contiguous(), "y": label[rest].contiguous()},
                work / "val.safetensors",
            )
            (work / "rules.yaml").write_text(f"""\
version: 1
source: {{path: pretrained.pt, key: model}}
target: {{model: {REPO / "rules" / "models.py"}:digits_cnn, kwargs: {{num_classes: 2}}}}
output: transfer_init.safetensors
seed: {draw}
rules:
  - {{op: reinit_mismatched, pattern: '^fc\\.'}}
""")
            ckptsurgeon.apply(work / "rules.yaml")
            for mode in ("transfer", "scratch"):
                torch.manual_seed(draw)
                model = digits_cnn(2)
                if mode == "transfer":
                    ckptsurgeon.load_into(model, work / "transfer_init.safetensors")
                spec = FinetuneSpec.model_validate(
                    {
                        "data": {
                            "train": {"tensors": "train.safetensors"},
                            "val": {"tensors": "val.safetensors"},
                        },
                        "freeze": {"modules": ["features"]},
                        "phases": [{"epochs": 60, "frozen": mode == "transfer", "lr": 0.05}],
                        "batch_size": 16,
                        "output_dir": f"run_{mode}",
                        "seed": draw,
                        "optimizer": {"name": "sgd", "momentum": 0.9},
                    }
                )
                summary = run_finetune(spec, model, base_dir=str(work), log=quiet)
                results[mode].append(summary["final"]["val_acc"])
        cells = [f"{statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f}" for v in results.values()]
        print(f"| {k} | {cells[0]} | {cells[1]} |")
    print(f"\n{draws} draws each; val = all of half B not used for training; 60 epochs, SGD 0.05.")


def _digits_data(work: Path, n: int = 1797) -> None:
    x_a, y_a, x_b, y_b = digits_split()
    x, y = torch.cat([x_a, x_b])[:n], torch.cat([y_a, y_b])[:n]
    save_file({"x": x.contiguous(), "y": y.contiguous()}, work / "train.safetensors")


def overhead(repeat: int = 5, epochs: int = 5) -> None:
    """(b) The runner against the plain loop a user would write, same model, data, steps."""
    work = Path(tempfile.mkdtemp(prefix="ckptsurgeon-overhead-"))
    _digits_data(work)
    data = ckptsurgeon.load(work / "train.safetensors")
    x, y = data["x"], data["y"]
    spec = FinetuneSpec.model_validate(
        {
            "data": {"train": {"tensors": "train.safetensors"}},
            "freeze": {"modules": ["features"]},
            "phases": [{"epochs": epochs, "frozen": False, "lr": 0.05}],
            "batch_size": 32,
            "output_dir": "run",
            "cache_features": False,
            "optimizer": {"name": "sgd", "momentum": 0.9},
        }
    )

    def plain() -> float:
        torch.manual_seed(0)
        model = digits_cnn(10)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True
        )
        t = time.perf_counter()
        for _ in range(epochs):
            model.train()
            for xb, yb in loader:
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return time.perf_counter() - t

    def runner() -> float:
        torch.manual_seed(0)
        model = digits_cnn(10)
        t = time.perf_counter()
        run_finetune(spec, model, base_dir=str(work), log=quiet)
        return time.perf_counter() - t

    plain(), runner()  # warm-up
    times = {"plain": [], "runner": []}
    for _ in range(repeat):  # interleaved, so machine noise hits both alike
        times["plain"].append(plain())
        times["runner"].append(runner())
    p, r = statistics.median(times["plain"]), statistics.median(times["runner"])
    print("| loop | median wall (s) | vs plain |")
    print("|---|---|---|")
    print(f"| hand-written loop | {p:.3f} | 1.00x |")
    print(
        f"| ckptsurgeon runner (incl. per-epoch checkpoint, metrics, state) | {r:.3f} | {r / p:.2f}x |"
    )
    print(
        f"\n{epochs} epochs of the digits CNN on 1797 samples, batch 32, {repeat} interleaved runs."
    )


def cache(epochs: int = 4, n: int = 512) -> None:
    """(c) A frozen torchvision resnet18 at 64x64: epochs with and without cached features."""
    import torchvision

    work = Path(tempfile.mkdtemp(prefix="ckptsurgeon-cache-"))
    gen = torch.Generator().manual_seed(0)
    save_file(
        {
            "x": torch.randn(n, 3, 64, 64, generator=gen),
            "y": torch.randint(0, 10, (n,), generator=gen),
        },
        work / "train.safetensors",
    )
    rows = {}
    finals = {}
    for cached in (False, True):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
        spec = FinetuneSpec.model_validate(
            {
                "data": {"train": {"tensors": "train.safetensors"}},
                "freeze": {"first_children": 9},
                "phases": [{"epochs": epochs, "frozen": True, "lr": 0.01}],
                "batch_size": 64,
                "output_dir": f"run_{cached}",
                "cache_features": cached,
            }
        )
        t = time.perf_counter()
        summary = run_finetune(spec, model, base_dir=str(work), log=quiet)
        total = time.perf_counter() - t
        import json

        lines = [
            json.loads(s)
            for s in (work / f"run_{cached}" / "metrics.jsonl").read_text().splitlines()
        ]
        rows[cached] = (total, statistics.median(m["seconds"] for m in lines[1:]))
        finals[cached] = summary["final"]["train_loss"]
    (u_total, u_epoch), (c_total, c_epoch) = rows[False], rows[True]
    print("| frozen resnet18, 64x64, 512 images | whole run (s) | epoch after the first (s) |")
    print("|---|---|---|")
    print(f"| uncached | {u_total:.2f} | {u_epoch:.3f} |")
    print(f"| cached features | {c_total:.2f} | {c_epoch:.4f} |")
    print(
        f"\nepoch speed-up: {u_epoch / c_epoch:.0f}x; whole run {u_total / c_total:.1f}x; "
        f"final train loss {finals[False]:.5f} (uncached) vs {finals[True]:.5f} (cached)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["transfer", "overhead", "cache", "all"])
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in ("transfer", "overhead", "cache"):
        if args.which in (name, "all"):
            print(f"\n## {name}\n")
            globals()[name]()


if __name__ == "__main__":
    main()
