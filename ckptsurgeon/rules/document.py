"""A whole rules file: read, validated, with errors that name file, line and field."""

from __future__ import annotations

import os
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, ValidationError

from ckptsurgeon.errors import RulesError
from ckptsurgeon.formats.checkpoint import did_you_mean
from ckptsurgeon.rules import yamlnodes
from ckptsurgeon.rules.config import CheckSpec, OutputSpec, SourceSpec, Strict, TargetSpec
from ckptsurgeon.rules.finetune import FinetuneSpec
from ckptsurgeon.rules.ops import AnyOp, FromSources
from ckptsurgeon.rules.verify import VerifySpec


class NamedSource(SourceSpec):
    """One of ``sources:``: a checkpoint beside the source, read as the source is."""

    dotless: str | None = Field(
        None,
        description="read the EMA copy kept under this prefix with dots removed from its "
        "names (Stable Diffusion's model_ema.*), named as the weights it shadows",
    )


class RulesFile(Strict):
    """The top level of a rules file (see SPEC.md, "Rules file")."""

    version: Literal[1] = 1
    source: str | SourceSpec | None = Field(None, description="checkpoint path, or {path, key}")
    sources: dict[str, str | NamedSource] = Field(
        default_factory=dict, description="more named inputs, for take and average"
    )
    target: TargetSpec | None = None
    output: OutputSpec | str | None = None
    seed: int = Field(0, description="for every re-initialised tensor")
    rules: list[AnyOp] = Field(default_factory=list)  # type: ignore[valid-type]
    check: CheckSpec = Field(default_factory=CheckSpec)
    finetune: FinetuneSpec | None = None
    verify: VerifySpec | None = None

    @property
    def source_spec(self) -> SourceSpec | None:
        return SourceSpec(path=self.source) if isinstance(self.source, str) else self.source

    def named_sources(self) -> dict[str, NamedSource]:
        """``sources:`` with every entry as a :class:`NamedSource` (paths as written)."""
        return {
            name: NamedSource(path=spec) if isinstance(spec, str) else spec
            for name, spec in self.sources.items()
        }

    @property
    def output_spec(self) -> OutputSpec:
        if isinstance(self.output, str):
            return OutputSpec(path=self.output)
        return self.output or OutputSpec()


def _label(loc: tuple[Any, ...], data: Any) -> str:
    """A readable field path: ``rules[2] (rename).replace``."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int) and isinstance(node, list):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{item}]"]
            node = node[item] if item < len(node) else None
            if isinstance(node, dict) and "op" in node:
                parts[-1] += f" ({node['op']})"
        elif isinstance(node, dict) and item in node:
            parts.append(str(item))
            node = node[item]
        elif isinstance(node, dict) and node.get("op") == item:
            continue  # the discriminated union's tag: already shown after the index
        else:
            parts.append(str(item))
            node = None
    return ".".join(parts) or "(top level)"


def _clean_loc(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """Drop pydantic's union tags from ``loc`` so it walks the YAML document."""
    out: list[Any] = []
    node = data
    for item in loc:
        if isinstance(node, list) and isinstance(item, int):
            node = node[item] if item < len(node) else None
        elif isinstance(node, dict) and item in node:
            node = node[item]
        else:
            continue
        out.append(item)
    return tuple(out)


def validate_document(located: yamlnodes.Located) -> RulesFile:
    """Validate a parsed document; RulesError lists each problem at its line."""
    data = located.value
    if not isinstance(data, dict):
        raise RulesError(f"{located.filename}: a rules file is a mapping with a 'rules:' list")
    try:
        rules = RulesFile.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False)[:10]:
            loc = tuple(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = _unknown_field(loc)
            elif err["type"] == "union_tag_invalid":
                msg = _unknown_op(err.get("input", {}).get("op"))
            elif err["type"] == "union_tag_not_found" and loc[:1] == ("rules",):
                msg = "no 'op' field: every rule names its op (op: rename, op: drop, ...)"
            lines.append(f"{located.where(_clean_loc(loc, data))}: {_label(loc, data)}: {msg}")
        more = len(exc.errors()) - len(lines)
        if more > 0:
            lines.append(f"... and {more} more")
        raise RulesError("invalid rules file:\n  " + "\n  ".join(lines)) from None
    _check_sources_declared(rules, located)
    return rules


def _check_sources_declared(rules: RulesFile, located: yamlnodes.Located) -> None:
    """Every source an op reads (take, average) must be one the file declares: a typo found
    now, not after the other inputs have been opened."""
    for i, op in enumerate(rules.rules):
        if not isinstance(op, FromSources):
            continue
        names = op.source_names()
        for j, name in enumerate(names):
            if name in rules.sources:
                continue
            loc = ("rules", i, "from", j) if isinstance(op.from_, list) else ("rules", i, "from")
            declared = ", ".join(map(repr, rules.sources)) or "none"
            hint = did_you_mean(name, rules.sources)
            raise RulesError(
                f"invalid rules file:\n  {located.where(loc)}: rules[{i}] ({op.op}).from: "
                f"no source named {name!r} under sources: (declared: {declared})"
                + (f"; {hint}" if hint else "")
            )


def _known_ops() -> list[str]:
    from ckptsurgeon.rules.ops import OPS

    return list(OPS)


def _unknown_op(op: Any) -> str:
    hint = did_you_mean(op, _known_ops()) if isinstance(op, str) else ""
    known = "known ops: " + ", ".join(sorted(_known_ops()))
    return f"unknown op {op!r}; {hint} {known}" if hint else f"unknown op {op!r}; {known}"


def _unknown_field(loc: tuple[Any, ...]) -> str:
    """The message for an unknown field at ``loc``, naming the fields accepted there: the
    closest to the one given (a typo), or all of them."""
    known = _fields_at(loc[:-1])
    if not known:
        return "unknown field"
    hint = did_you_mean(str(loc[-1]), known)
    return (
        f"unknown field; {hint}" if hint else f"unknown field; expected one of: {', '.join(known)}"
    )


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The names of the fields the section at pydantic's ``loc`` takes (as a rules file
    spells them: aliases), found by walking the models from :class:`RulesFile`: a field name
    steps into its type, a union's tag (a model's name, an op) picks that member, and list
    indices and mapping keys stay on the same models. Empty when that is not one model."""
    models: list[type[BaseModel]] = [RulesFile]
    for item in loc:
        if not isinstance(item, str):
            continue
        holders = [m for m in models if item in _field_names(m)]
        if holders:
            fields = [_field(m, item) for m in holders]
            models = [inner for f in fields for inner in _models_in(f.annotation)]
            continue
        tagged = [m for m in models if item in (m.__name__, _op_tag(m))]
        models = tagged or models
    names = {tuple(_field_names(m)) for m in models}
    return sorted(names.pop()) if len(names) == 1 else []


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _field(model: type[BaseModel], name: str) -> Any:
    return next(f for n, f in model.model_fields.items() if (f.alias or n) == name)


def _op_tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("op")
    return field.default if field is not None and isinstance(field.default, str) else None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models an annotation holds: itself, or inside a union, Annotated, list or dict."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def load_rules(path: str | os.PathLike) -> RulesFile:
    """Read and validate the rules file at ``path``; nothing is loaded but YAML."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(yamlnodes.MAX_BYTES + 1)
    except FileNotFoundError:
        raise RulesError(f"{path}: no such rules file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(f"{path}: cannot read: {exc}") from None
    located = yamlnodes.parse(text, path)
    rules = validate_document(located)
    _check_target_given(rules, located)
    return rules


def _check_target_given(rules: RulesFile, located: yamlnodes.Located) -> None:
    """A file's reinit/fill ops take fresh values from its target; without one they could
    only fail at apply time (or, marked optional, quietly do nothing). The Python API
    passes its target beside the rules, so only files are held to this."""
    if rules.verify is not None and not (rules.target and rules.target.model):
        raise RulesError(
            f"invalid rules file:\n  {located.where(('verify',))}: verify: needs target.model "
            "(the model the result is loaded into and run)"
        )
    if rules.target is not None:
        return
    for i, op in enumerate(rules.rules):
        if op.needs_target:
            raise RulesError(
                f"invalid rules file:\n  {located.where(('rules', i))}: rules[{i}] ({op.op}): "
                "needs a target (target.model, target.checkpoint or target.manifest)"
            )


def parse_rules(rules: list[dict[str, Any]] | dict[str, Any], where: str = "<rules>") -> RulesFile:
    """Validate rules given as Python data (the API's ``rules=[...]``)."""
    data = {"rules": rules} if isinstance(rules, list) else rules
    return validate_document(yamlnodes.Located(where, data, {}))


def parse_document(data: dict[str, Any], where: str = "<rules mapping>") -> RulesFile:
    """Validate a whole rules document given as Python data, held to what a file is."""
    located = yamlnodes.Located(where, data, {})
    rules = validate_document(located)
    _check_target_given(rules, located)
    return rules
