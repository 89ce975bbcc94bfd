"""Make the example source checkpoints that the rules files in ``rules/`` convert.

Every checkpoint is written by the library a user would have it from (torchvision,
DataParallel, torch.compile, Lightning, transformers), seeded, with nothing downloaded:

    python examples/make_checkpoints.py            # all of them, into examples/checkpoints/
    python examples/make_checkpoints.py resnet18_dp

Tests import these functions to build the same checkpoints in temporary folders.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BERT = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128, max_position_embeddings=64)


def resnet18_dp(folder: Path) -> Path:
    """A torchvision resnet18 (ImageNet head) saved from under nn.DataParallel."""
    import torchvision

    torch.manual_seed(0)
    model = torch.nn.DataParallel(torchvision.models.resnet18())
    path = folder / "resnet18_dp.pth"
    torch.save(model.state_dict(), path)
    return path


def resnet18_plain(folder: Path) -> Path:
    """A plain torchvision resnet18 state dict (10 classes)."""
    import torchvision

    torch.manual_seed(1)
    path = folder / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    return path


def resnet18_compiled_train(folder: Path) -> Path:
    """A training-loop container {"model", "optimizer", "epoch"} of a torch.compile'd model."""
    import torchvision

    torch.manual_seed(2)
    model = torchvision.models.resnet18(num_classes=10)
    compiled = torch.compile(model)  # state_dict keys gain "_orig_mod."
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4))
    loss.backward()
    optimizer.step()
    path = folder / "resnet18_compiled_train.pt"
    torch.save({"model": compiled.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3},
               path)
    return path


def resnet18_lightning(folder: Path) -> Path:
    """A real Lightning Trainer checkpoint of a LightningModule holding ``self.model``."""
    import lightning as L
    import torchvision

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = torchvision.models.resnet18(num_classes=10)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=folder)
    trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=4))
    path = folder / "resnet18_lightning.ckpt"
    trainer.save_checkpoint(path)
    return path


def alexnet(folder: Path) -> Path:
    """A torchvision AlexNet with its 1000-class classifier[6]."""
    import torchvision

    torch.manual_seed(4)
    path = folder / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), path)
    return path


def meta_llama(folder: Path) -> Path:
    """A small Llama in Meta's original layout (``consolidated.00.pth``: ``tok_embeddings``,
    ``layers.N.attention.wq``, interleaved rotary rows), as Meta's own code saves it."""
    sys.path.insert(0, str(HERE))
    from meta_llama import MetaTransformer

    torch.manual_seed(6)
    model = MetaTransformer()
    for name, param in model.named_parameters():  # norms away from 1, as after training
        if name.endswith("norm.weight"):
            torch.nn.init.normal_(param, 1.0, 0.2)
    path = folder / "meta_llama" / "consolidated.00.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def bert_encoder(folder: Path) -> Path:
    """A small Hugging Face BertModel (encoder only) saved with save_pretrained."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(5)
    path = folder / "bert_encoder"
    BertModel(BertConfig(**BERT)).save_pretrained(path)
    return path


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits as (N, 1, 8, 8) floats, split in two fixed halves."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    half = len(y) // 2
    return x[:half], y[:half], x[half:], y[half:]


def pretrain(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int):
    """Train ``model`` on (x, y) with plain SGD (the "pretrained backbone"); returns it."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def pretrain_digits(x: torch.Tensor, y: torch.Tensor, epochs: int = 15, seed: int = 0):
    """Train the digits CNN on all 10 classes (the "pretrained backbone")."""
    sys.path.insert(0, str(HERE.parent / "rules"))
    from models import digits_cnn

    torch.manual_seed(seed)
    return pretrain(digits_cnn(num_classes=10), x, y, epochs)


def digits(folder: Path) -> Path:
    """A digits CNN pretrained on one half of the digits (10 classes, saved in a training
    container), and a new task on the other half: parity (even/odd), as train/val tensors."""
    from safetensors.torch import save_file

    x_pre, y_pre, x_new, y_new = digits_split()
    model = pretrain_digits(x_pre, y_pre)
    path = folder / "digits_pretrained.pt"
    torch.save({"model": model.state_dict(), "epoch": 15}, path)
    parity = y_new % 2
    cut = len(parity) // 2
    save_file({"x": x_new[:cut].contiguous(), "y": parity[:cut].contiguous()},
              folder / "digits_parity_train.safetensors")
    save_file({"x": x_new[cut:].contiguous(), "y": parity[cut:].contiguous()},
              folder / "digits_parity_val.safetensors")
    return path


EXAMPLES: dict[str, Callable[[Path], Path]] = {
    f.__name__: f
    for f in (resnet18_dp, resnet18_plain, resnet18_compiled_train, resnet18_lightning, alexnet,
              bert_encoder, meta_llama, digits)
}


def run(examples: dict[str, Callable[[Path], Path]], description: str) -> None:
    """The example scripts' command line: make the named examples (default: all) in --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("names", nargs="*", choices=[[], *examples], help="default: all")
    parser.add_argument("--out", type=Path, default=HERE / "checkpoints")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in args.names or examples:
        print(f"{name}: {examples[name](args.out)}")


def main() -> None:
    run(EXAMPLES, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
