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
            raise ConfigError(f"graph/label_set/order: {error}") from None
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
    given = {name: value for name, value in given.items() if value is not None}
    stored = PolicyFormat.load(folder)
    if stored is None:
        return PolicyFormat(**given)
    clashes = [f"{name}={value!r} but the {source} in {folder} was trained with {name}={getattr(stored, name)!r}"
               for name, value in given.items() if value != getattr(stored, name)]
    if clashes:
        raise ConfigError("; ".join(clashes) + " (leave the setting out to use the folder's)")
    return stored
