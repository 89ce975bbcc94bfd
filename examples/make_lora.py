"""Make the example for ``rules/merge_lora.yaml``: a tiny Llama's base weights and a PEFT
LoRA adapter made on it, with nothing downloaded:

    python examples/make_lora.py        # into examples/checkpoints/tiny_llama_lora/

(``python examples/make_checkpoints.py`` makes it too, with all the other examples.)

The adapter is what ``peft``'s ``save_pretrained`` writes (``adapter_config.json`` and
``adapter_model.safetensors``), with its factors set to seeded random values as if trained
(a fresh LoRA's ``lora_B`` is zero, and merging it would change nothing). ``tiny_llama``
builds the model again (a target for the rules file).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
LLAMA = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip


def tiny_llama():
    """The (untrained) tiny ``LlamaForCausalLM`` the example's base weights come from."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


def make(folder: Path) -> tuple[Path, Path]:
    """Write ``base.safetensors`` and ``adapter/`` into ``folder``; returns their paths."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    torch.manual_seed(0)
    base = tiny_llama()
    folder.mkdir(parents=True, exist_ok=True)
    base_path = folder / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, base_path)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        rank_pattern={"o_proj": 4},
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
    adapter = folder / "adapter"
    peft_model.save_pretrained(adapter)
    return base_path, adapter


def tiny_llama_lora(folder: Path) -> Path:
    """``make`` into ``folder/tiny_llama_lora`` (where the rules file looks); returns it."""
    make(folder / "tiny_llama_lora")
    return folder / "tiny_llama_lora"


def main() -> None:
    from make_checkpoints import quiet  # a sibling script: the same quiet libraries

    quiet()
    for path in make(HERE / "checkpoints" / "tiny_llama_lora"):
        print(path)


if __name__ == "__main__":
    main()
