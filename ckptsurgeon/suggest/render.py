"""The suggested rules as a YAML file a person reads and ``apply`` accepts.

Each rule carries a comment saying why it is there and how many keys it covers. Patterns,
replacements, prefixes and key names are single-quoted, where YAML reads every character
as written (a backslash stays a backslash; a key named ``yes`` or ``null`` stays a string).
The text is parsed back and validated before it is returned, so what is printed is what
was verified.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from ckptsurgeon.rules import yamlnodes
from ckptsurgeon.rules.config import SourceSpec, TargetSpec
from ckptsurgeon.rules.document import validate_document
from ckptsurgeon.suggest.diff import DiffReport

VERBATIM_FIELDS = {"op", "init", "dtype"}  # enum-like values, written plain


class _Quoted(str):
    """A string written in single quotes."""


class _Dumper(yaml.SafeDumper):
    """Block style, nested lists indented under their key, no anchors or aliases."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(
    _Quoted, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", str(s), style="'")
)


def _dump(data: Any) -> str:
    return yaml.dump(
        data,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=2**31 - 1,  # never fold a long pattern onto two lines
    )


def _quoted(value: Any) -> Any:
    """Strings (also inside lists and mappings, keys included) as single-quoted."""
    if isinstance(value, str):
        return _Quoted(value)
    if isinstance(value, list):
        return [_quoted(v) for v in value]
    if isinstance(value, dict):
        return {_quoted(k): _quoted(v) for k, v in value.items()}
    return value


def _rule_yaml(rule: dict[str, Any]) -> str:
    data = {k: v if k in VERBATIM_FIELDS else _quoted(v) for k, v in rule.items()}
    return _dump([data])


def absolute_target(spec: TargetSpec) -> TargetSpec:
    """The same target with its file paths absolute (a rules file resolves relative paths
    against its own folder, which is not where the command ran)."""
    changes: dict[str, Any] = {}
    if spec.checkpoint:
        changes["checkpoint"] = os.path.abspath(os.path.expanduser(spec.checkpoint))
    if spec.manifest:
        changes["manifest"] = os.path.abspath(os.path.expanduser(spec.manifest))
    if spec.model:
        module, sep, attr = spec.model.rpartition(":")
        if module.endswith(".py"):
            changes["model"] = os.path.abspath(os.path.expanduser(module)) + sep + attr
    return spec.model_copy(update=changes)


def _comment(text: str, indent: str = "") -> str:
    return "".join(f"{indent}# {line}\n" for line in text.splitlines() or [""])


def render_rules(
    report: DiffReport,
    source: SourceSpec,
    target: TargetSpec,
    verify: dict[str, Any] | None = None,
) -> str:
    """The complete rules file: header, ``source``/``target`` filled in, ``output`` left for
    the user, each rule with its comment, and ``verify`` (a section that has passed) when
    given. Raises RuntimeError if the text would not read back as the rules that were
    verified (a bug, never the user's input)."""
    parts = [_header(report)]
    head: dict[str, Any] = {"version": 1}
    given = source.model_dump(exclude_defaults=True)
    head["source"] = (
        _quoted(source.path)
        if set(given) == {"path"}
        else {k: _quoted(v) for k, v in given.items()}
    )
    head["target"] = _target_data(target)
    parts.append(_dump(head))
    parts.append(
        "output: null  # .safetensors, .pt/.pth/.bin or a folder; or apply --output PATH\n"
    )
    parts.append(f"seed: {report.rules.seed}\n")
    with_rules = [f for f in report.inference.findings if f.rule is not None]
    if not with_rules:
        parts.append("rules: []\n")
    else:
        parts.append("rules:\n")
        for finding in with_rules:
            parts.append(_comment(finding.line, "  "))
            parts.append(
                "".join("  " + line + "\n" for line in _rule_yaml(finding.rule).splitlines())
            )
    if verify is not None:
        parts.append(
            _comment("Verified: the result computes what the source computes in the reference.")
        )
        parts.append(_dump({"verify": verify}))
    notes = [f.summary for f in report.inference.findings if f.rule is None]
    if notes:
        parts.append(_comment("Notes:\n" + "\n".join(f"  {n}" for n in notes)))
    text = "".join(parts)
    _check_round_trip(text, report)
    return text


def _header(report: DiffReport) -> str:
    src = report.source
    lines = [
        "Suggested by `ckptsurgeon diff --suggest`: rules that make",
        f"  A: {src.path} ({src.format}, {len(src.tensors)} tensors"
        + (f", container {src.container!r})" if src.container else ")"),
        "load strictly into",
        f"  B: {report.target.description} ({len(report.target.expected)} tensors)",
    ]
    if report.identical:
        lines.append("A already loads strictly into B: there is nothing to change.")
    elif report.reconciled:
        lines.append("Verified: with these rules, A loads strictly into B.")
    else:
        lines.append("NOT RECONCILED: with these rules, apply still fails the strict check:")
        lines += [f"  {line}" for line in report.remaining()]
    lines += [
        "Set output (or pass --output), then: ckptsurgeon apply THIS_FILE",
        "Paths are absolute; relative ones would resolve against this file's folder.",
    ]
    return _comment("\n".join(lines))


def _target_data(spec: TargetSpec) -> dict[str, Any]:
    data = spec.model_dump(exclude_defaults=True)
    return {k: v if k == "kwargs" else _quoted(v) for k, v in data.items()}


def _check_round_trip(text: str, report: DiffReport) -> None:
    parsed = validate_document(yamlnodes.parse(text, "<suggested rules>"))
    if [r.model_dump() for r in parsed.rules] != [r.model_dump() for r in report.rules.rules]:
        raise RuntimeError("the suggested rules file does not read back as the verified rules")
