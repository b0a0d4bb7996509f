"""Zero-shot grading instructions, declared as data (YAML under `prompts/`) and rendered into chat messages.

A judge prompt lets any local instruct model judge pairs without our training: the label set's
definitions, the query and the product go into a user turn (and an optional system turn) that the
model's own chat template wraps; the label is read after `answer_prefix` in the assistant's turn. Its
text is the file's (see `prompts/zero_shot.yaml` for the placeholders); users copy and edit it and pass
the path wherever a prompt name is accepted. `digest` hashes the content, not the comments, so an
edited text is another judge (the scoring cache keys on it).

The CoT order picks the task: `label_first` answers at once (`direct`); any other order asks for the
reasoning graph's nodes step by step in that order (`reasoning`), then the answer line.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from string import Template

import yaml

from schemas.graph import LabelSet, ReasoningGraph, resolve_yaml

POLICY_PROMPT = "policy"  # not a file: the prompt a trained policy reads (training.prompt.build_prompt), as it was trained
PRODUCT_FIELDS = ("title", "type", "attributes", "description")
# The placeholders each text may use (the module doc of prompts/zero_shot.yaml says what they hold).
PLACEHOLDERS = {
    "system": (),
    "user": ("labels", "names", "query", "product", "task"),
    "label": ("name", "description"),
    "direct": ("names", "answer"),
    "reasoning": ("steps", "names", "answer"),
    "step": ("name", "description", "values"),
}
REQUIRED = {"user": ("query", "product", "task"), "label": ("name",), "reasoning": ("steps",), "step": ("name",)}
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")  # the name goes into the model version and the scoring folder's name


@dataclass(frozen=True)
class JudgePrompt:
    """The texts of one zero-shot prompt (placeholders unfilled) and the answer prefix the label follows."""

    name: str
    system: str
    user: str
    label: str
    direct: str
    reasoning: str
    step: str
    answer_prefix: str

    def __post_init__(self) -> None:
        where = f"prompt {self.name!r}"
        if not NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"{where}: name must be letters, digits, '_', '.' or '-' (it names the model version)")
        if not self.answer_prefix.strip() or "\n" in self.answer_prefix:
            raise ValueError(f"{where}: answer_prefix must be one line of text (the label follows it), got {self.answer_prefix!r}")
        for key, allowed in PLACEHOLDERS.items():
            template = Template(getattr(self, key))
            if not template.is_valid():
                raise ValueError(f"{where}: {key}: a '$' that starts no placeholder (write $$ for a dollar sign)")
            used = set(template.get_identifiers())
            unknown = sorted(used - set(allowed))
            missing = sorted(set(REQUIRED.get(key, ())) - used)
            if unknown or missing:
                raise ValueError(f"{where}: {key}: unknown placeholders {unknown} / missing placeholders {missing}; "
                                 f"it may use {['$' + name for name in allowed]}")

    @classmethod
    def load(cls, name_or_path: str | Path) -> JudgePrompt:
        """A bundled prompt by name (`zero_shot`) or a YAML file by path; every key required, no other allowed."""
        path = resolve_yaml(name_or_path, "prompts", "prompt")
        raw = yaml.safe_load(path.read_text())
        keys = [field.name for field in fields(cls)]
        if not isinstance(raw, dict) or sorted(raw) != sorted(keys):
            given = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"{path}: a prompt file holds exactly the keys {keys}, got {given}")
        wrong = [key for key in keys if not isinstance(raw[key], str)]
        if wrong:
            raise ValueError(f"{path}: {wrong} must be text")
        try:
            return cls(**raw)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    @property
    def digest(self) -> str:
        """12 hex digits of a sha256 over the prompt's content: the same for the same texts, whatever the comments."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ZeroShot:
    """A judge prompt filled in for one label set, reasoning graph and CoT order."""

    prompt: JudgePrompt
    labels: LabelSet
    graph: ReasoningGraph
    order: str

    @property
    def reasoning_first(self) -> bool:
        """Whether the model reasons before the label (any order but one that starts with the label)."""
        return not self.graph.label_comes_first(self.order)

    def task(self) -> str:
        names = ", ".join(self.labels.names)
        if not self.reasoning_first:
            return Template(self.prompt.direct).substitute(names=names, answer=self.prompt.answer_prefix.strip())
        steps = []
        for name in self.graph.order(self.order):
            node = self.graph.node(name)
            if name == self.graph.label_node:
                continue
            values = f" (one of: {', '.join(node.values)})" if node.kind == "choice" else ""
            steps.append(Template(self.prompt.step).substitute(name=name, description=node.description, values=values))
        return Template(self.prompt.reasoning).substitute(steps="\n".join(steps), names=names, answer=self.prompt.answer_prefix.strip())

    def messages(self, fields: Mapping[str, str]) -> list[dict[str, str]]:
        """The chat messages of one pair, from its prompt fields (`training.prompt.build_prompt`'s, within the budget)."""
        label_lines = "\n".join(Template(self.prompt.label).substitute(name=label.name, description=label.description)
                                for label in self.labels.labels)
        product = "\n".join(f"{name}: {fields[name]}" for name in PRODUCT_FIELDS if fields.get(name))
        user = Template(self.prompt.user).substitute(labels=label_lines, names=", ".join(self.labels.names), query=fields["query"],
                                                     product=product, task=self.task())
        system = Template(self.prompt.system).substitute()
        return ([{"role": "system", "content": system}] if system.strip() else []) + [{"role": "user", "content": user}]
