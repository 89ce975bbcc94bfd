"""Make the inputs of the rules files that combine checkpoints (``average_checkpoints``,
``take_from_other``, ``sd_ema_weights``, ``dequantize_fp8``), seeded, nothing downloaded:

    python examples/make_combine.py            # all, into examples/checkpoints/
    python examples/make_combine.py resnet18_snapshots

(``python examples/make_checkpoints.py`` makes them too, with all the other examples.)

Tests import these functions to build the same inputs in temporary folders.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _step(model: torch.nn.Module, seed: int) -> None:
    """A stand-in for a training step, cheap enough to build in a test: a forward pass in
    train mode (BatchNorm's running statistics and ``num_batches_tracked`` move) and a
    seeded nudge to every parameter."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32, generator=gen))
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-2)


def resnet18_snapshots(folder: Path) -> Path:
    """Three snapshots of one resnet18 (10 classes) training run, a step apart, as timm's
    ``train.py`` saves them (``{"state_dict": ..., "epoch": ...}``); returns the first."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    for epoch in (1, 2, 3):
        _step(model, seed=epoch)
        torch.save(
            {"state_dict": model.state_dict(), "epoch": epoch}, folder / f"resnet18_ep{epoch}.pth"
        )
    return folder / "resnet18_ep1.pth"


def resnet18_head_run(folder: Path) -> Path:
    """A second resnet18 (10 classes) run, whose trained ``fc`` head another checkpoint's
    backbone is to take (``take_from_other``), saved as safetensors."""
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(5)
    model = torchvision.models.resnet18(num_classes=10)
    _step(model, seed=9)
    path = folder / "resnet18_head_run.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


class LitEma(torch.nn.Module):
    """CompVis latent diffusion's EMA keeper (``ldm/modules/ema.py``): a buffer per
    trainable parameter, named without its dots, plus ``decay`` and ``num_updates``."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9) -> None:
        super().__init__()
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.clone().detach().data)

    def forward(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        shadow = dict(self.named_buffers())
        with torch.no_grad():
            for key, p in model.named_parameters():
                s = shadow[self.m_name2s_name[key]]
                s.sub_((1.0 - decay) * (s - p))

    def copy_to(self, model: torch.nn.Module) -> None:
        shadow = dict(self.named_buffers())
        for key, p in model.named_parameters():
            p.data.copy_(shadow[self.m_name2s_name[key]].data)


def tiny_unet() -> torch.nn.Module:
    """A tiny stand-in for SD's ``DiffusionWrapper``: ``diffusion_model.input_blocks.0.0``,
    ``middle_block``, ``out.2``, the nesting that makes names like ``input_blocks00``."""
    seq = torch.nn.Sequential
    unet = torch.nn.Module()
    unet.input_blocks = torch.nn.ModuleList([seq(torch.nn.Conv2d(4, 8, 3, padding=1))])
    unet.middle_block = seq(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.GroupNorm(2, 8))
    unet.out = seq(torch.nn.SiLU(), torch.nn.Identity(), torch.nn.Conv2d(8, 4, 3, padding=1))
    wrapper = torch.nn.Module()
    wrapper.diffusion_model = unet
    return wrapper


def tiny_sd(folder: Path) -> Path:
    """A Stable Diffusion v1-style ``.ckpt``: ``{"state_dict": {model.*, model_ema.*,
    first_stage_model.*}, "global_step"}``, with the EMA 5 updates behind the weights."""
    torch.manual_seed(3)
    ldm = torch.nn.Module()
    ldm.model = tiny_unet()
    ldm.first_stage_model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))
    ldm.model_ema = ema = LitEma(ldm.model)
    for _ in range(5):
        with torch.no_grad():
            for p in ldm.model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ema(ldm.model)
    path = folder / "tiny_sd.ckpt"
    torch.save({"state_dict": ldm.state_dict(), "global_step": 5}, path)
    return path


FP8_SHAPES = {"layers.0.mlp.up_proj": (300, 200), "layers.0.mlp.down_proj": (200, 300)}


def fp8_blockwise(folder: Path) -> Path:
    """A DeepSeek-V3-style safetensors file: float8_e4m3fn Linear weights, each with a
    float32 ``weight_scale_inv`` of one value per 128 x 128 block (edge blocks partial),
    beside a bfloat16 norm that is not quantized."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(7)
    state: dict[str, torch.Tensor] = {}
    for name, (rows, cols) in FP8_SHAPES.items():
        state[f"{name}.weight"] = torch.randn(rows, cols, generator=gen).to(torch.float8_e4m3fn)
        blocks = (-(-rows // 128), -(-cols // 128))
        state[f"{name}.weight_scale_inv"] = torch.rand(blocks, generator=gen) * 0.01 + 1e-3
    state["layers.0.norm.weight"] = torch.ones(200, dtype=torch.bfloat16)
    path = folder / "fp8_blockwise.safetensors"
    save_file(state, path)
    return path


EXAMPLES: dict[str, Callable[[Path], Path]] = {
    f.__name__: f for f in (resnet18_snapshots, resnet18_head_run, tiny_sd, fp8_blockwise)
}


def main() -> None:
    from make_checkpoints import run  # a sibling script: the same command line

    run(EXAMPLES, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
