"""Make the example source checkpoints that the rules files in ``rules/`` convert.

Every checkpoint is written by the library a user would have it from (torchvision,
DataParallel, torch.compile, Lightning, transformers, timm, llama.cpp's gguf), seeded, with
nothing downloaded:

    python examples/make_checkpoints.py            # all of them, into examples/checkpoints/
    python examples/make_checkpoints.py resnet18_dp

It also makes what make_lora.py and make_combine.py make (all of it, or by the same names),
so that every rules file runs after this one command but minilm_to_classifier.yaml, which
reads a Hugging Face cache (make_hf_cache.py). Only its own lines are printed: what it wrote
and where (the libraries' notes and progress bars are silenced by name, see ``quiet``).

Tests import these functions to build the same checkpoints in temporary folders.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BERT = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128, max_position_embeddings=64)
# The small ViT of rules/timm_vit_to_hf_vit.yaml and rules/hf_vit_to_timm_vit.yaml, as timm
# builds it (create_model's arguments) and as transformers does (the ViTConfig).
VIT_TIMM = dict(model_name="vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8,
                depth=2)  # fmt: skip
VIT_HF = dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
              image_size=32, patch_size=8, num_channels=3, num_labels=10, hidden_act="gelu",
              layer_norm_eps=1e-6, qkv_bias=True)  # fmt: skip
# The tiny Llama of rules/gguf_llama_to_hf.yaml (hidden 256: a whole number of quant blocks).
GGUF_LLAMA = dict(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)  # fmt: skip


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
    # Lightning logs its set-up at INFO ("GPU available: False", a tip to install litlogger,
    # "`Trainer.fit` stopped") on the "lightning.pytorch" logger, whose level importing it
    # sets; its other warnings (WARNING and up) still show. Two are not for the reader: that
    # a GPU goes unused (this example trains on the CPU on purpose), and torch's
    # FutureWarning about LeafSpec, which Lightning 2.6 trips (a matter between the two).
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="GPU available but not used")
            warnings.filterwarnings(
                "ignore",
                category=FutureWarning,
                message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
            )
            trainer = L.Trainer(
                max_steps=1,
                accelerator="cpu",
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=folder,
            )
            trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=4))
        path = folder / "resnet18_lightning.ckpt"
        # weights_only=False is the default (the full checkpoint: optimizer, loops,
        # callbacks), said explicitly so that Lightning does not log that it chose it.
        trainer.save_checkpoint(path, weights_only=False)
    finally:
        lightning_log.setLevel(level)
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


def _perturbed(model: torch.nn.Module, scale: float = 0.02) -> torch.nn.Module:
    """Seeded noise on every parameter, as after training: no bias stays zero, no norm one,
    so a swapped or dropped tensor shows in the converted model's outputs."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * scale)
    return model


def timm_vit(folder: Path) -> Path:
    """A small timm ViT (``timm.create_model``, VIT_TIMM; fused ``blocks.N.attn.qkv``) state
    dict, saved as safetensors, for ``rules/timm_vit_to_hf_vit.yaml``."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)
    model = _perturbed(timm.create_model(**VIT_TIMM, pretrained=False))
    path = folder / "vit_timm.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def hf_vit(folder: Path) -> Path:
    """A small transformers ``ViTForImageClassification`` (VIT_HF) state dict, saved as
    safetensors under the model's own (transformers >= 5) names, for
    ``rules/hf_vit_to_timm_vit.yaml``. (``save_pretrained`` would write the 4.x names.)"""
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(8)
    model = _perturbed(ViTForImageClassification(ViTConfig(**VIT_HF)))
    path = folder / "vit_hf.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def _interleave(w, heads: int):
    """transformers' half-split rotary rows -> llama.cpp's interleaved ones (its converter's
    ``LlamaModel.permute``): each head's first and second halves become adjacent pairs."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def gguf_llama(folder: Path) -> Path:
    """A tiny Llama (GGUF_LLAMA) as llama.cpp's convert_hf_to_gguf.py writes one with
    ``--outtype q8_0``, for ``rules/gguf_llama_to_hf.yaml``: GGUF names (``token_embd``,
    ``blk.N.attn_q``, ...), the rows of attn_q/attn_k interleaved per head, the ``llama.*``
    metadata, 2-D weights in Q8_0 and the norms in F32; written with gguf's GGUFWriter."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(9)
    model = LlamaForCausalLM(LlamaConfig(**GGUF_LLAMA))
    with torch.no_grad():  # norms away from 1, as after training
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    cfg = model.config
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }  # fmt: skip
    path = folder / "tiny_llama_q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(GGUF_LLAMA["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    for key, tensor in model.state_dict().items():
        w = tensor.float().numpy()
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            name = "output.weight"
        else:  # model.layers.N.<module>.weight
            parts = key.split(".")
            module = ".".join(parts[3:-1])
            if module == "self_attn.q_proj":
                w = _interleave(w, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                w = _interleave(w, cfg.num_key_value_heads)
            name = f"blk.{parts[2]}.{names[module]}.weight"
        if w.ndim == 1:
            writer.add_tensor(name, w, raw_dtype=gguf.GGMLQuantizationType.F32)
        else:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
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
              bert_encoder, meta_llama, digits, timm_vit, hf_vit, gguf_llama)
}


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet() -> None:
    """Keep the example scripts' output to their own lines: the libraries they call would
    otherwise print progress bars and notes a new user takes for problems. Each is silenced
    by name; other warnings and errors still show."""
    from importlib.util import find_spec

    # DeepSpeed (imported by accelerate when transformers' save_pretrained unwraps a model)
    # logs at WARNING, on stdout, that it found no GPU and uses the CPU. Its logger keeps a
    # filter added before DeepSpeed is imported (importing it sets the level and handler).
    logging.getLogger("DeepSpeed").addFilter(_DropMessage("Setting accelerator to CPU"))
    if find_spec("transformers") is not None:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()  # save_pretrained's "Writing model shards"
    if find_spec("huggingface_hub") is not None:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def run(examples: dict[str, Callable[[Path], Path]], description: str) -> None:
    """The example scripts' command line: make the named examples (default: all) in --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("names", nargs="*", choices=[[], *examples], help="default: all")
    parser.add_argument("--out", type=Path, default=HERE / "checkpoints")
    args = parser.parse_args()
    quiet()
    os.makedirs(args.out, exist_ok=True)
    for name in args.names or examples:
        print(f"{name}: {examples[name](args.out)}")


def everything() -> dict[str, Callable[[Path], Path]]:
    """These examples, make_lora.py's and make_combine.py's: every rules file's inputs but
    the Hugging Face cache that make_hf_cache.py lays out."""
    sys.path.insert(0, str(HERE))
    import make_combine
    import make_lora

    return {**EXAMPLES, "tiny_llama_lora": make_lora.tiny_llama_lora, **make_combine.EXAMPLES}


def main() -> None:
    run(everything(), __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
