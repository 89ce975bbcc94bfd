"""Fine-tune runner benchmarks, each printed as a table measured side by side in one run.

python benchmarks/bench_finetune.py transfer   # (a) transfer vs scratch on sklearn digits
python benchmarks/bench_finetune.py overhead   # (b) runner vs a hand-written loop
python benchmarks/bench_finetune.py cache      # (c) cached vs uncached frozen resnet18 epochs
python benchmarks/bench_finetune.py strategies # (d) the decision table, measured (--quick: a smoke run)
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

from make_checkpoints import digits_split, pretrain, pretrain_digits  # noqa: E402
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


# -- (d) strategies: the transfer-learning decision table, measured -------------------------

SIZE = 16  # image side: small enough for 2 CPU cores, large enough for shapes to differ
CLASSES = 5  # every target task
SOURCE_SHAPES = ("circle", "square", "plus", "cross", "triangle", "hbar")
SIMILAR_SHAPES = ("disc", "box", "diamond", "vbar", "ell")  # new classes, same kind of image
TEXTURES = ("gauss", "uniform", "binary", "sparse", "laplace")  # same mean and spread
FEW, MANY, VAL = 20, 300, 100  # examples per class: little data, much data, validation
FIXED = ("head_only", "partial", "full", "scratch")
RECOMMENDED = {  # the guide's table: (data, domain) -> strategy
    ("few", "shapes"): "head_only",
    ("few", "textures"): "partial",
    ("many", "shapes"): "full",
    ("many", "textures"): "scratch",
}


class StrategiesCNN(torch.nn.Module):
    """Three conv blocks and a linear head on the globally pooled features (16x16 gray)."""

    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def strategies_cnn(num_classes: int = CLASSES) -> torch.nn.Module:
    """The benchmark's model, as a rules file's ``file.py:callable``."""
    return StrategiesCNN(num_classes)


def _shape_mask(name: str, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Where shape ``name`` of radius ``r`` (per image) lies on offsets (dx, dy) from its centre."""
    ax, ay, dist = dx.abs(), dy.abs(), (dx**2 + dy**2).sqrt()
    box = torch.maximum(ax, ay)
    masks = {
        "circle": (dist - r).abs() < 0.8,
        "disc": dist < r,
        "square": (box - r).abs() < 0.8,
        "box": box < r,
        "diamond": ((ax + ay) - r).abs() < 0.8,
        "plus": ((ax < 1) & (ay < r)) | ((ay < 1) & (ax < r)),
        "cross": ((ax - ay).abs() < 1) & (box < r),
        "hbar": (ay < 1) & (ax < r),
        "vbar": (ax < 1) & (ay < r),
        "triangle": (dy.abs() < r) & (2 * ax <= dy + r),
        "ell": (((dx + r).abs() < 1) & (ay < r)) | (((dy - r).abs() < 1) & (ax < r)),
    }
    return masks[name]


def shapes(names: tuple[str, ...], per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Outlines and filled shapes at random places and sizes on noise: one class a name."""
    gen = torch.Generator().manual_seed(seed)
    n = per_class * len(names)
    y = torch.arange(len(names)).repeat_interleave(per_class)
    grid = torch.arange(SIZE, dtype=torch.float32)
    cx = SIZE / 2 + (torch.rand(n, 1, 1, generator=gen) - 0.5) * 6
    cy = SIZE / 2 + (torch.rand(n, 1, 1, generator=gen) - 0.5) * 6
    r = 3.5 + torch.rand(n, 1, 1, generator=gen) * 2.5
    dx, dy = grid.view(1, 1, -1) - cx, grid.view(1, -1, 1) - cy
    x = torch.zeros(n, SIZE, SIZE)
    for c, name in enumerate(names):
        rows = y == c
        x[rows] = _shape_mask(name, dx[rows], dy[rows], r[rows]).float()
    x = x + 0.3 * torch.randn(n, SIZE, SIZE, generator=gen)
    return x.unsqueeze(1), y


def textures(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent pixels, one distribution a class, all with mean 0 and spread 1: the
    classes differ only in the shape of the pixel distribution, which no shape needs."""
    gen = torch.Generator().manual_seed(seed)
    shape = (per_class, 1, SIZE, SIZE)
    draws = {
        "gauss": lambda: torch.randn(shape, generator=gen),
        "uniform": lambda: (torch.rand(shape, generator=gen) - 0.5) * 12**0.5,
        "binary": lambda: torch.randint(0, 2, shape, generator=gen).float() * 2 - 1,
        "sparse": lambda: ((torch.rand(shape, generator=gen) < 0.1).float() - 0.1) / (0.09**0.5),
        "laplace": lambda: _laplace(shape, gen),
    }
    x = torch.cat([draws[name]() for name in TEXTURES])
    y = torch.arange(len(TEXTURES)).repeat_interleave(per_class)
    return x, y


def _laplace(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=gen) - 0.5
    # rand can return 0, and log(0) is -inf: one such pixel turns a whole run to NaN.
    tail = (1 - 2 * u.abs()).clamp_min(1e-7)
    return -torch.sign(u) * torch.log(tail) / 2**0.5  # unit variance


def _task(domain: str, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if domain == "shapes":
        return shapes(SIMILAR_SHAPES, per_class, seed)
    return textures(per_class, seed)


def _pretrain_source(work: Path, epochs: int) -> float:
    """The source model: StrategiesCNN trained on SOURCE_SHAPES (seconds); its accuracy."""
    torch.manual_seed(0)
    x, y = shapes(SOURCE_SHAPES, 400, seed=1)
    model = pretrain(strategies_cnn(len(SOURCE_SHAPES)), x, y, epochs)
    model.eval()
    xv, yv = shapes(SOURCE_SHAPES, 100, seed=2)
    with torch.no_grad():
        accuracy = float((model(xv).argmax(1) == yv).float().mean())
    torch.save({"model": model.state_dict()}, work / "source.pt")
    return accuracy


def _one_run(work: Path, strategy: str, draw: int, epochs: int, device: str) -> dict[str, object]:
    """Surgery (a new 5-class head) and the fine-tune, through ckptsurgeon.apply: the
    runner's own entry. Returns the run's summary."""
    document = {
        "version": 1,
        "source": {"path": str(work / "source.pt"), "key": "model"},
        "target": {
            "model": f"{Path(__file__).resolve()}:strategies_cnn",
            "kwargs": {"num_classes": CLASSES},
        },
        "output": str(work / "init.safetensors"),
        "seed": draw,
        "rules": [{"op": "reinit_mismatched", "pattern": "^fc\\."}],
        "finetune": {
            "data": {
                "train": {"tensors": str(work / "train.safetensors")},
                "val": {"tensors": str(work / "val.safetensors")},
            },
            "strategy": strategy,
            "epochs": epochs,
            "lr": 0.05,
            "optimizer": {"name": "sgd", "momentum": 0.9, "weight_decay": 1.0e-4},
            "batch_size": 32,
            "device": device,
            "output_dir": str(work / f"run_{strategy}"),
            "seed": draw,
        },
    }
    report = ckptsurgeon.apply(document)
    return report["finetune"]


def _cell(values: list[float], best: bool) -> str:
    text = f"{100 * statistics.mean(values):.1f} ± {100 * statistics.pstdev(values):.1f}"
    return f"**{text}**" if best else text


def strategies(quick: bool = False, device: str = "auto") -> None:
    """(d) Four target tasks, one per case of the decision table; every strategy on each.

    The source model learns six shapes. The targets: five *other* shapes (a similar
    domain) and five pixel-noise textures (a different one: the classes differ in the
    distribution of the pixel values, which no shape needed), each at FEW and MANY
    examples per class. Every strategy gets the same budget (epochs, head LR 0.05, SGD)."""
    begun = time.perf_counter()
    # One intra-op thread: on these tiny convolutions a second thread only adds contention
    # (on a shared 2-core machine a step took 15 ms with one thread, 250 ms with two).
    torch.set_num_threads(1)
    draws, epochs = (1, 4) if quick else (3, 12)
    work = Path(tempfile.mkdtemp(prefix="ckptsurgeon-strategies-"))
    source_acc = _pretrain_source(work, epochs=3 if quick else 8)
    print(f"source: {len(SOURCE_SHAPES)} shapes, {SIZE}x{SIZE}, accuracy {source_acc:.3f}")
    rows = []
    every_fraction: list[float] = []
    for (data, domain), recommended in RECOMMENDED.items():
        per_class = FEW if data == "few" else MANY
        results: dict[str, list[float]] = {name: [] for name in (*FIXED, "auto")}
        picks: list[str] = []
        fractions: list[float] = []
        for draw in range(draws):
            x, y = _task(domain, per_class, seed=100 + draw)
            xv, yv = _task(domain, VAL, seed=900 + draw)
            save_file({"x": x.contiguous(), "y": y}, work / "train.safetensors")
            save_file({"x": xv.contiguous(), "y": yv}, work / "val.safetensors")
            for name in results:
                summary = _one_run(work, name, draw, epochs, device)
                results[name].append(summary["final"]["val_acc"])
                if name == "auto":
                    record = summary["strategy"]
                    picks.append(record["chosen"])
                    fractions.append(record["measure_fraction"])
        print(f"  done: {data}, {domain} ({time.perf_counter() - begun:.0f} s)", file=sys.stderr)
        every_fraction += fractions
        means = {k: statistics.mean(v) for k, v in results.items()}
        top = max(means[k] for k in FIXED)
        cells = [_cell(results[k], means[k] == top) for k in FIXED]
        best = max(FIXED, key=lambda k: means[k])
        spread = statistics.pstdev(results[best]) + statistics.pstdev(results[recommended])
        holds = "yes" if top - means[recommended] <= spread else "no"
        auto_gap = 100 * (top - means["auto"])
        rows.append(
            f"| {data} ({per_class}/class), {domain} | {recommended} | "
            + " | ".join(cells)
            + f" | {holds} | {_cell(results['auto'], False)} ({', '.join(picks)}) | "
            f"{auto_gap:+.1f} | {100 * max(fractions):.1f}% |"
        )
    print(
        "| case | table says | head_only | partial | full | scratch | table holds | "
        "auto (its picks) | best - auto (points) | auto's probe, max share of run |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(
        f"\nval accuracy (%), mean ± spread (population std) over {draws} draws of the data "
        f"and seed; {epochs} epochs, head LR 0.05, SGD momentum 0.9, batch 32; validation "
        f"{VAL}/class, never seen by auto. 'table holds': the recommended strategy is within "
        "the summed spreads of the best. auto's measurement (the probe) took "
        f"{100 * statistics.mean(every_fraction):.1f}% of its run's wall time on average, "
        f"{100 * max(every_fraction):.1f}% at most. Wall time "
        f"{time.perf_counter() - begun:.0f} s."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["transfer", "overhead", "cache", "strategies", "all"])
    parser.add_argument(
        "--quick", action="store_true", help="strategies: one draw, a third of the epochs"
    )
    parser.add_argument("--device", default="auto", help="strategies: finetune.device")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in ("transfer", "overhead", "cache", "strategies"):
        if args.which in (name, "all"):
            print(f"\n## {name}\n")
            if name == "strategies":
                strategies(quick=args.quick, device=args.device)
            else:
                globals()[name]()


if __name__ == "__main__":
    main()
