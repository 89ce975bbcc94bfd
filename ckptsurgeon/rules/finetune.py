"""The rules file's ``finetune:`` section as pydantic models (no torch import: ``validate``
stays fast)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ckptsurgeon.rules.config import Pattern, Strict


class TensorData(Strict):
    """Tensors in a safetensors (or torch) file: ``x`` (N, ...) and ``y`` (N,) by default."""

    tensors: str
    inputs: str | dict[str, str] = Field(
        "x", description="tensor name, or {model kwarg: tensor name} to call model(**inputs)"
    )
    target: str = "y"


class ImageFolderData(Strict):
    """A torchvision ImageFolder: class-named sub-folders of images (needs torchvision)."""

    image_folder: str
    image_size: int = Field(224, gt=0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


class FactoryData(Strict):
    """``file.py:callable`` or ``pkg.module:callable`` returning a torch Dataset."""

    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    augments: bool = Field(
        True, description="set false when the dataset is deterministic (allows feature caching)"
    )


DataSpec = TensorData | ImageFolderData | FactoryData


class DataSection(Strict):
    train: DataSpec
    val: DataSpec | None = None
    num_workers: int | Literal["auto"] = "auto"


class FreezeSpec(Strict):
    """What the backbone is: the union of modules, patterns and first_children, minus except."""

    modules: list[str] = Field(default_factory=list, description="attribute paths")
    patterns: list[Pattern] = Field(default_factory=list, description="regexes over param names")
    first_children: int | None = Field(None, ge=0, description="the first N children")
    except_: list[Pattern] = Field(
        default_factory=list, alias="except", description="never frozen (regexes over param names)"
    )
    train_bn: bool = Field(False, description="let frozen BatchNorm update its running stats")

    model_config = Strict.model_config | {"populate_by_name": True}


class PhaseSpec(Strict):
    epochs: int = Field(gt=0)
    frozen: bool = True
    unfreeze: list[Pattern] = Field(
        default_factory=list,
        description="module paths or regexes over parameter names: this part of the frozen "
        "backbone trains in this phase (with backbone_lr_scale), the rest stays frozen",
    )
    lr: float = Field(gt=0)
    backbone_lr_scale: float = Field(1.0, ge=0)
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="timm's layer-wise LR decay: each block further from the head gets this "
        "factor once more (blocks: see the README)",
    )
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _unfreeze_needs_frozen(self) -> PhaseSpec:
        if self.unfreeze and not self.frozen:
            raise ValueError(
                "unfreeze goes with frozen: true (frozen: false already trains the whole backbone)"
            )
        return self


class OptimizerSpec(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    nesterov: bool = False
    decay_norm_and_bias: bool = Field(
        False, description="apply weight decay to biases and norm weights too"
    )


Strategy = Literal["head_only", "partial", "full", "scratch", "auto"]


class FinetuneSpec(Strict):
    """A fine-tune (see SPEC.md, "Fine-tune section"): ``freeze`` and ``phases`` given, or a
    ``strategy`` with its budget (``epochs``, ``lr``) that expands into them at run time
    (:mod:`ckptsurgeon.finetune.strategy`; ``--dry-run`` prints the expansion)."""

    model: str | None = Field(None, description="defaults to target.model")
    kwargs: dict[str, Any] | None = Field(None, description="defaults to target.kwargs")
    weights: str | None = Field(None, description="default: the checkpoint apply just wrote")
    data: DataSection
    # Declared before freeze and phases: their validators read it.
    strategy: Strategy | None = Field(
        None,
        description="head_only | partial | full | scratch | auto, instead of freeze + phases",
    )
    epochs: int | None = Field(None, gt=0, description="with a strategy: the total epochs")
    lr: float | None = Field(None, gt=0, description="with a strategy: the head's LR")
    freeze_depth: int | None = Field(
        None,
        ge=0,
        description="with strategy: partial, how many backbone blocks (from the input) stay "
        "frozen; default: half of them",
    )
    freeze: FreezeSpec = Field(default_factory=FreezeSpec)
    phases: list[PhaseSpec] = Field(default_factory=list)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    batch_size: int = Field(64, gt=0)
    device: Literal["auto", "cpu", "cuda"] | str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    cache_features: Literal["auto"] | bool = "auto"
    output_dir: str = "runs/finetune"
    seed: int = 0
    grad_clip: float | None = Field(None, gt=0)

    @field_validator("freeze")
    @classmethod
    def _strategy_chooses_the_freeze(cls, v: FreezeSpec, info: ValidationInfo) -> FreezeSpec:
        strategy = info.data.get("strategy")
        if strategy and (v.modules or v.patterns or v.first_children is not None):
            raise ValueError(
                f"strategy: {strategy} chooses what is frozen; with a strategy, freeze takes "
                "only except (the head, never frozen) and train_bn"
            )
        return v

    @field_validator("phases")
    @classmethod
    def _strategy_makes_the_phases(
        cls, v: list[PhaseSpec], info: ValidationInfo
    ) -> list[PhaseSpec]:
        strategy = info.data.get("strategy")
        if strategy and v:
            raise ValueError(
                f"strategy: {strategy} expands into its own phases; give either phases, or "
                "a strategy with epochs and lr (--dry-run prints the expansion)"
            )
        return v

    @model_validator(mode="after")
    def _phases_or_a_strategy(self) -> FinetuneSpec:
        if self.strategy is None:
            budget = [k for k in ("epochs", "lr", "freeze_depth") if getattr(self, k) is not None]
            if budget:
                raise ValueError(
                    f"{', '.join(budget)}: a strategy's budget; without a strategy, each phase "
                    "gives its own epochs and lr"
                )
            if not self.phases:
                raise ValueError("give phases, or a strategy with epochs and lr")
            return self
        missing = [k for k in ("epochs", "lr") if getattr(self, k) is None]
        if missing:
            raise ValueError(
                f"strategy: {self.strategy} needs {' and '.join(missing)} (the total epochs and "
                "the head's LR, which the strategy splits into phases)"
            )
        if self.freeze_depth is not None and self.strategy != "partial":
            raise ValueError(
                f"freeze_depth goes with strategy: partial (strategy: {self.strategy} "
                + ("measures it" if self.strategy == "auto" else "freezes no depth") + ")"
            )
        return self

    @model_validator(mode="after")
    def _something_to_freeze(self) -> FinetuneSpec:
        f = self.freeze
        selects = f.modules or f.patterns or f.first_children
        if any(p.frozen for p in self.phases) and not selects:
            raise ValueError(
                "a phase has frozen: true but freeze selects nothing "
                "(give modules, patterns or first_children)"
            )
        return self
