"""``diff --suggest --verify``: a ``verify:`` section for the suggested rules, and its run.

The inputs are guessed from the reference model's first layer with weights (token ids for
an embedding, images for a convolution, vectors for a linear layer), sized from the model's
own configuration where it has one; the section is only printed once it has passed.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ckptsurgeon.engine.plan import run_rules
from ckptsurgeon.engine.verify import VerifyResult, verify
from ckptsurgeon.errors import UsageError
from ckptsurgeon.rules.config import SourceSpec
from ckptsurgeon.rules.verify import VerifySpec
from ckptsurgeon.suggest.diff import DiffReport
from ckptsurgeon.targets.config import TargetSpec
from ckptsurgeon.targets.models import build_meta_model

BATCH = 2
TOKENS = 16
DEFAULT_IMAGE = 64


def _image_size(model: nn.Module) -> int:
    """The image size the model was built for: transformers' ``config.image_size``, timm's
    ``patch_embed.img_size``, else a size any convolutional network takes."""
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", None)
    patch_embed = getattr(model, "patch_embed", None)
    size = size or getattr(patch_embed, "img_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    return int(size) if size else DEFAULT_IMAGE


def guess_inputs(model: nn.Module) -> list[dict[str, Any]]:
    """Seeded-input specs the model's first layer with weights accepts."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            high = module.num_embeddings
            return [{"shape": [BATCH, TOKENS], "dtype": "int64", "high": high}]
        if isinstance(module, nn.Conv2d):
            size = _image_size(model)
            return [{"shape": [BATCH, module.in_channels, size, size]}]
        if isinstance(module, nn.Conv1d):
            return [{"shape": [BATCH, module.in_channels, 256]}]
        if isinstance(module, nn.Linear):
            return [{"shape": [BATCH, module.in_features]}]
    raise UsageError(
        "diff --verify: cannot guess inputs for the reference model (its first layer is not "
        "an embedding, a convolution or a linear layer); write the verify: section by hand"
    )


def suggest_verify(
    report: DiffReport,
    source: SourceSpec,
    target: TargetSpec,
    reference: TargetSpec,
    base_dir: str,
) -> tuple[dict[str, Any], VerifyResult]:
    """The ``verify:`` section for the suggested rules, and the result of running it on the
    result the rules make (no file is written)."""
    if not target.model or not reference.model:
        raise UsageError("diff --verify: --target and --reference must both be model specs")
    model, _ = build_meta_model(reference.model, reference.kwargs, base_dir)
    section: dict[str, Any] = {
        "reference": {
            "model": reference.model,
            **({"kwargs": reference.kwargs} if reference.kwargs else {}),
        },
        "inputs": guess_inputs(model),
        "compare": ["output"],
    }
    spec = VerifySpec.model_validate(section)
    table, _ = run_rules(report.rules, report.source.tensors, report.target)
    result = verify(
        spec,
        seed=report.rules.seed,
        base_dir=base_dir,
        source=source,
        target=target,
        result=table,
        result_plan=table,
    )
    return section, result
