"""What a trained policy folder says about how it was trained: `policy.json` next to the weights.

A policy reads and writes one CoT format: the reasoning graph, the label set, the CoT order and the
prompt token budget. SFT and GRPO write it into the folder they save (`PolicyFormat.save`); every
reader of a policy (GRPO, distillation, scoring, the nightly job) takes it from there with
`resolve_format`, so nothing downstream restates it. A setting given anyway must agree with the
folder: a contradiction is refused with a message naming both values, since a policy scored with
another order or budget than it was trained with writes labels nobody asked for.

A folder without `policy.json` (a checkpoint brought from elsewhere, or one saved before the file
existed) takes the given settings, else the defaults below.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from schemas.config import ConfigError
from schemas.graph import LabelSet, ReasoningGraph

POLICY_FORMAT_FILE = "policy.json"
STUDENT_FILE = "student.json"  # a distilled student folder says the same in its own file


@dataclass(frozen=True)
class PolicyFormat:
    """The CoT format of a policy: graph name or YAML path, label set, CoT order, prompt token budget."""

    graph: str = "relevance7"
    label_set: str = "wands"
    order: str = "label_first"
    prompt_tokens: int = 48

    def __post_init__(self) -> None:
        try:
            ReasoningGraph.load(self.graph).order(self.order)
            LabelSet.load(self.label_set)
        except ValueError as error:
            raise ConfigError(f"graph/order/label_set: {error}") from None
        if self.prompt_tokens < 1:
            raise ConfigError(f"prompt_tokens: must be a positive whole number, got {self.prompt_tokens}")

    def save(self, folder: str | Path) -> Path:
        """Write `policy.json` into the policy folder (created when missing)."""
        path = Path(folder) / POLICY_FORMAT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> PolicyFormat | None:
        """The folder's format, or None when it has no `policy.json`."""
        path = Path(folder) / POLICY_FORMAT_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(raw) - known)
        missing = sorted(known - set(raw))
        if unknown or missing:
            raise ConfigError(f"{path}: unexpected keys {unknown} / missing keys {missing}; expected {sorted(known)}")
        return cls(**raw)


def resolve_format(folder: str | Path, *, graph: str | None = None, label_set: str | None = None, order: str | None = None,
                   prompt_tokens: int | None = None, source: str = "policy") -> PolicyFormat:
    """The format of the policy in `folder`, checked against the settings a command was given.

    A given setting (not None) that differs from the folder's raises ConfigError naming the setting,
    both values and the folder; `source` names the folder's role in the message (policy, teacher, ...).
    """
    given = {"graph": graph, "label_set": label_set, "order": order, "prompt_tokens": prompt_tokens}
    stored = PolicyFormat.load(folder)
    if stored is None:
        return PolicyFormat(**{name: value for name, value in given.items() if value is not None})
    _refuse_clashes(given, asdict(stored), folder, source, ())
    return stored


def student_meta(folder: str | Path) -> dict:
    """A distilled student folder's `student.json` (graph, label set, input length, heads; `training.student` writes it)."""
    return json.loads((Path(folder) / STUDENT_FILE).read_text())


def resolve_student_format(folder: str | Path, *, graph: str | None = None, label_set: str | None = None, order: str | None = None,
                           prompt_tokens: int | None = None) -> PolicyFormat:
    """The graph and label set of the student in `folder` (its student.json), checked as `resolve_format` checks
    a policy's; the student reads no CoT and no prompt budget, so a given `order` or `prompt_tokens` is refused too."""
    if not (Path(folder) / STUDENT_FILE).is_file():
        raise ConfigError(f"model: {folder} has no {STUDENT_FILE}; the student backend scores a folder `relevance train distill` wrote")
    meta = student_meta(folder)
    given = {"graph": graph, "label_set": label_set, "order": order, "prompt_tokens": prompt_tokens}
    _refuse_clashes(given, meta, folder, "student", ("order", "prompt_tokens"))
    return PolicyFormat(graph=meta["graph"], label_set=meta["label_set"])


def _refuse_clashes(given: dict, stored: dict, folder: str | Path, source: str, not_applying: tuple[str, ...]) -> None:
    """ConfigError naming each given setting (not None) that differs from the folder's or does not apply to it."""
    clashes = [f"{name}={value!r} does not apply to the {source} backend (it reads no CoT and no prompt budget)" if name in not_applying
               else f"{name}={value!r} but the {source} in {folder} was trained with {name}={stored[name]!r}"
               for name, value in given.items() if value is not None and (name in not_applying or value != stored[name])]
    if clashes:
        raise ConfigError("; ".join(clashes) + " (leave the setting out to use the folder's)")
