"""The CoT text format: node values <-> text, and text tokens -> nodes. The only place that knows it.

A CoT is one line per node of a `ReasoningGraph`, `tag: value`, in one of the graph's orders
(`label_first`, `reasoning_first`), lines joined by a single newline, no trailing newline; the end
of sequence is the tokenizer's EOS, appended by the caller.

Parsing is total: it never raises on a generation, it returns a `ParsedCoT` that says which nodes
are missing and what was wrong. Two modes:

- `strict` (the reward parser): the text must be exactly the order's lines, in order, each value
  valid for its node kind (choice vocabulary, facets format, label set), nothing before, between or
  after. Lines are read from the top and reading stops at the first deviation, so a node only gets
  a value from its own line in its own place (its first occurrence): a generation that pads junk
  node lines after the real ones is not `well_formed`.
- `lenient` (metrics): any line `tag: value` whose tag is a node counts, in any order, the first
  occurrence of each node wins, junk lines are skipped, invalid values are dropped.

`node_spans` / `token_nodes` map characters and then tokenizer offsets to nodes: every token that
overlaps a node's line (tag, colon and value) belongs to that node; the newline separators and
tokens with empty offsets (special tokens such as EOS) belong to none.

`CheckedRules` / `CheckedVerdicts`: checked decoding, where what the graph says follows from values already written
is computed, not guessed: the yes/no of each attribute check (the graph's `checks_node`) is the comparison of the two
values it wrote before it (`verdicts_follow_values`, `schemas.graph.check_verdict`), and a choice node with
`equal_parents` (relevance8's `ms`) takes that value exactly when its parents' values are the same text
(`decision_follows_parents`). A small policy copies both values right and then gets the verdict wrong in about 40% of
its wrong checks (benchmarks/results/verdict_errors.md), and writes `ms: match` under two different subjects it wrote
itself (benchmarks/results/quality.md, session 23). The comparisons are exact string equality, sound where values are
canonical (the synthetic world's, or a catalog normalised upstream); where `grey` must equal `gray` they say no, so
checked decoding is an option and not the default.

`cot_regex` is the format as a regular expression (Python `re` and xgrammar syntax alike), for
constrained decoding: every text `render_cot` writes for valid values matches it (text values, facet
keys and facet values up to `VALUE_MAX_CHARS` characters), and every text it matches is `well_formed`
under the strict parse, except one rule a regular expression cannot state: a facets value whose keys
repeat (`color=red; color=blue`) matches but does not parse.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from schemas.graph import FACETS_NONE, ReasoningGraph, check_verdict, parse_facets

SEPARATOR = ": "
MODES = ("strict", "lenient")
VALUE_MAX_CHARS = 64
# The characters str.strip() removes (str.isspace()) as the body of a regex class: a value neither starts nor ends with one.
STRIP_CLASS = r"\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_REGEX_SPECIAL = "\\.^$*+?{}[]|()"
# Tokens a whole CoT may take, the default of every generation that must reach the end (scoring, validation, rollouts,
# teacher targets): relevance8's product_first CoT of the demo world is 72 tokens at the median and 132 at the longest
# under the default tokenizer (7.5% of test pairs pass 96). A CoT cut short has no label line, so the budget must cover it.
COT_TOKEN_BUDGET = 144


@dataclass(frozen=True)
class ParsedCoT:
    """What a parse recovered: `values` (node -> value) for the nodes found, `missing` in order."""

    values: dict[str, str]
    missing: tuple[str, ...]
    well_formed: bool
    problems: tuple[str, ...]

    def get(self, node: str) -> str | None:
        return self.values.get(node)


def render_cot(values: Mapping[str, str], graph: ReasoningGraph, order: str) -> str:
    """The CoT text of `values` (every node of `graph`) in the named order, without EOS."""
    lines = []
    for node in graph.order(order):
        if node not in values:
            raise ValueError(f"render_cot: no value for node {node!r} (graph {graph.name!r}); got {sorted(values)}")
        value = str(values[node])
        if "\n" in value or value != value.strip() or not value:
            raise ValueError(f"render_cot: node {node!r} value {value!r} must be one non-empty line without edge spaces")
        lines.append(f"{node}{SEPARATOR}{value}")
    return "\n".join(lines)


def _literal(text: str) -> str:
    """`text` as a regex matching exactly it (only metacharacters escaped: xgrammar warns on `re.escape`'s `\\ `)."""
    return "".join("\\" + char if char in _REGEX_SPECIAL else char for char in text)


def _trimmed(excluded: str) -> str:
    """Regex of 1 to VALUE_MAX_CHARS characters outside `excluded` and newlines, not starting or ending with whitespace."""
    edge = f"[^{excluded}{STRIP_CLASS}]"
    return f"{edge}(?:[^{excluded}\\n]{{0,{VALUE_MAX_CHARS - 2}}}{edge})?"


def cot_regex(graph: ReasoningGraph, labels: Sequence[str], order: str) -> str:
    """The regex of a whole CoT of `graph` in the named order with the label set's names `labels` (see the module doc)."""
    entry = f"{_trimmed('=;')}={_trimmed(';')}"  # the key ends at the first '=' (parse_facets), the value may hold more
    patterns = {
        "text": _trimmed(""),
        "facets": f"(?:{_literal(FACETS_NONE)}|{entry}(?:; {entry})*)",
        "label": "(?:" + "|".join(map(_literal, labels)) + ")",
    }
    lines = []
    for name in graph.order(order):
        node = graph.node(name)
        value = "(?:" + "|".join(map(_literal, node.values)) + ")" if node.kind == "choice" else patterns[node.kind]
        lines.append(_literal(f"{name}{SEPARATOR}") + value)
    return "\\n".join(lines)


def _value_problem(node: str, value: str, graph: ReasoningGraph, labels: Sequence[str] | None) -> str | None:
    """Why `value` is not a valid value of `node`, or None when it is."""
    if not value or value != value.strip():
        return f"{node}: empty value or spaces around it ({value!r})"
    kind = graph.node(node)
    if kind.kind == "choice" and value not in kind.values:
        return f"{node}: {value!r} is not one of {list(kind.values)}"
    if kind.kind == "facets" and parse_facets(value) is None:
        return f"{node}: {value!r} is not 'key=value; ...' or 'none'"
    if kind.kind == "label" and labels is not None and value not in labels:
        return f"{node}: {value!r} is not a label of {list(labels)}"
    return None


def _split_line(line: str) -> tuple[str, str] | None:
    tag, sep, value = line.partition(SEPARATOR)
    return (tag, value) if sep else None


def parse_cot(
    text: str,
    graph: ReasoningGraph,
    order: str,
    labels: Sequence[str] | None = None,
    mode: str = "strict",
) -> ParsedCoT:
    """Parse a generation (EOS already removed) into node values; never raises on bad text.

    `labels` (the label set's names) validates the label node's value; None accepts any text.
    """
    if mode not in MODES:
        raise ValueError(f"parse_cot: unknown mode {mode!r}; use one of {list(MODES)}")
    expected = graph.order(order)
    lines = text.split("\n")
    values: dict[str, str] = {}
    problems: list[str] = []
    if mode == "strict":
        for position, line in enumerate(lines):
            if position >= len(expected):
                problems.append(f"line {position + 1}: text after the last node line ({line!r})")
                break
            node = expected[position]
            parts = _split_line(line)
            if parts is None or parts[0] != node:
                problems.append(f"line {position + 1}: expected '{node}: ...', got {line!r}")
                break
            problem = _value_problem(node, parts[1], graph, labels)
            if problem is not None:
                problems.append(f"line {position + 1}: {problem}")
                break
            values[node] = parts[1]
    else:
        for position, line in enumerate(lines):
            parts = _split_line(line.strip())
            if parts is None or parts[0].strip() not in expected or parts[0].strip() in values:
                continue
            node, value = parts[0].strip(), parts[1].strip()
            problem = _value_problem(node, value, graph, labels)
            if problem is None:
                values[node] = value
            else:
                problems.append(f"line {position + 1}: {problem}")
    missing = tuple(node for node in expected if node not in values)
    if missing and mode == "lenient":
        problems.append(f"missing nodes {list(missing)}")
    if mode == "strict":
        well_formed = not missing and not problems and len(lines) == len(expected)
    else:
        well_formed = parse_cot(text, graph, order, labels, "strict").well_formed
    return ParsedCoT(values=values, missing=missing, well_formed=well_formed, problems=tuple(problems))


def verdicts_follow_values(line: str, tag: str) -> bool:
    """Whether a checks line (`ac: key=wanted/offered:yes; ...`, whole or cut anywhere, possibly followed by a newline and
    more) says yes exactly where the two values are the same: every verdict it has finished is `check_verdict`'s, and
    one it has begun is that verdict's beginning. The line of another node is not judged (True). A colon followed by
    neither verdict's beginning is read as part of a value (`time=10:30`)."""
    if not line.startswith(tag):
        return True
    body, newline, _ = line[len(tag) :].partition("\n")
    entries = body.split(";")
    for position, entry in enumerate(entries):
        values, colon, verdict = entry.strip().partition("=")[2].rpartition(":")
        if not colon:
            continue
        right = check_verdict(values)
        wrong = "no" if right == "yes" else "yes"
        finished = bool(newline) or position < len(entries) - 1
        if (verdict and wrong.startswith(verdict)) or (finished and verdict != right and right.startswith(verdict)):
            return False
    return True


def may_break_a_rule(piece: str, words: Sequence[str] = ()) -> bool:
    """Whether appending `piece` to a line that `CheckedRules.follows` accepts can make it refused: only a piece that
    holds a colon, or starts by going on with a verdict or ending a line (y, e, s, n, o, `;`, newline), can refuse a
    checks line; with the `words` of a decision rule, also a piece holding a newline or whose text up to it is part of
    a word (it may go on with a refused one)."""
    if ":" in piece or piece[:1] in tuple("yesno;\n"):
        return True
    head = piece.partition("\n")[0].strip()
    return bool(words) and ("\n" in piece or (bool(head) and any(head in word for word in words)))


@dataclass(frozen=True)
class EqualParents:
    """A choice node's line (`tag`) takes `equal` exactly when the lines of its parents (`parent_tags`) hold the same
    text, and one of `others` otherwise (`ReasoningGraph` node `equal_parents`)."""

    tag: str
    parent_tags: tuple[str, ...]
    equal: str
    others: tuple[str, ...]


@dataclass(frozen=True)
class CheckedRules:
    """What checked decoding computes in a graph's CoT: the verdicts of the line tagged `checks` (None: no checks
    node) and the decisions of `equal_parents`. `to_json` / `from_json` carry it to a vLLM engine's logits processor."""

    checks: str | None
    equal_parents: tuple[EqualParents, ...] = ()

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(word for rule in self.equal_parents for word in (rule.equal, *rule.others))

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(tag for tag in (self.checks, *(rule.tag for rule in self.equal_parents)) if tag is not None)

    def follows(self, text: str, line_start: int) -> bool:
        """Whether the response `text`'s line beginning at `line_start` (whole or cut anywhere) breaks no rule."""
        line = text[line_start:]
        if self.checks is not None and line.startswith(self.checks):
            return verdicts_follow_values(line, self.checks)
        for rule in self.equal_parents:
            if line.startswith(rule.tag):
                return decision_follows_parents(text[:line_start], line, rule)
        return True

    def text_follows(self, text: str) -> bool:
        """Whether every line of the response `text` breaks no rule."""
        return all(self.follows(text, start) for start in (0, *(i + 1 for i, char in enumerate(text) if char == "\n")))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CheckedRules:
        raw = json.loads(text)
        return cls(checks=raw["checks"], equal_parents=tuple(
            EqualParents(rule["tag"], tuple(rule["parent_tags"]), rule["equal"], tuple(rule["others"])) for rule in raw["equal_parents"]))


def decision_follows_parents(before: str, line: str, rule: EqualParents) -> bool:
    """Whether the decision `line` (`ms: ...`, whole or cut, possibly followed by a newline and more) writes `rule.equal`
    only where the parent lines found in `before` (the response above it) hold the same text, and another of its values
    only where they do not: a value the parents refuse, or a beginning that only such a value has, is refused; text that
    is no value is left to the format (a grammar, or the strict parse). Without every parent line above it (an order that
    decides first) nothing is judged (True)."""
    parents = {}
    for written in before.split("\n"):
        for tag in rule.parent_tags:
            if written.startswith(tag) and tag not in parents:
                parents[tag] = written[len(tag):]
    if len(parents) < len(rule.parent_tags):
        return True
    equal = len(set(parents.values())) == 1
    allowed, refused = ((rule.equal,), rule.others) if equal else (rule.others, (rule.equal,))
    value, newline, _ = line[len(rule.tag):].partition("\n")
    if newline:
        return value not in refused
    return not any(word.startswith(value) for word in refused) or any(word.startswith(value) for word in allowed)


def checked_rules(graph: ReasoningGraph) -> CheckedRules:
    """The rules checked decoding applies in `graph`'s CoT; a ValueError when it has none (no `checks_node` and no node
    with `equal_parents`)."""
    digraph = graph.digraph()
    equal = tuple(
        EqualParents(f"{node.name}{SEPARATOR}", tuple(f"{parent}{SEPARATOR}" for parent in sorted(digraph.predecessors(node.name))),
                     node.equal_parents, tuple(value for value in node.values if value != node.equal_parents))
        for node in graph.nodes if node.equal_parents is not None)
    if graph.checks_node is None and not equal:
        raise ValueError(f"checked_verdicts: graph {graph.name!r} declares no checks_node (relevance8's ac) and no node with "
                         "equal_parents (relevance8's ms), so there is nothing to check")
    return CheckedRules(checks=f"{graph.checks_node}{SEPARATOR}" if graph.checks_node is not None else None, equal_parents=equal)


class CheckedVerdicts:
    """The token choice of checked decoding under `rules` (`checked_rules`): each greedy step takes the likeliest token,
    unless it would break a rule (a wrong verdict, or a decision its parents contradict); then the likeliest of the
    `candidates` likeliest tokens that does not. `training.decoding.generate` calls `choose` (greedy) or `refuse`
    (sampled: GRPO's rollouts draw from the tokens it does not refuse), the vLLM engine's logits processor
    (`training.vllm_checked_verdicts`) `pick`. `replaced` counts the steps where a token was refused, `unresolved` the
    greedy steps where no candidate would do (the likeliest stays)."""

    def __init__(self, tokenizer, rules: CheckedRules, candidates: int = 16) -> None:
        self.tokenizer = tokenizer
        self.rules = rules
        self.candidates = candidates
        self.replaced = self.unresolved = 0
        self._token_may_break: dict[int, bool] = {}

    def token_may_break_a_rule(self, token: int) -> bool:
        """`may_break_a_rule` of the token's text alone (a tokenizer may drop a leading space there, which only widens
        the test), cached per token: the other tokens are taken without decoding the response, which most steps are."""
        if token not in self._token_may_break:
            piece = self.tokenizer.decode([token], skip_special_tokens=False)
            self._token_may_break[token] = may_break_a_rule(piece, self.rules.words)
        return self._token_may_break[token]

    def _checked_line_start(self, ids: Sequence[int]) -> int | None:
        """Where the current line begins in the decoded response `ids`, when that line is (or may become) one a rule
        judges."""
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        line_start = text.rfind("\n") + 1
        line = text[line_start:]
        return line_start if any(line.startswith(tag) or tag.startswith(line) for tag in self.rules.tags) else None

    def _follows(self, ids: Sequence[int], token: int, line_start: int) -> bool:
        return self.rules.follows(self.tokenizer.decode([*ids, token], skip_special_tokens=False), line_start)

    def _ranked(self, logits) -> list[int]:
        """The `candidates` likeliest tokens, likeliest first, without those at -inf (a token a grammar forbids)."""
        top = logits.topk(min(self.candidates, len(logits)))
        return [token for token, logit in zip(top.indices.tolist(), top.values.tolist()) if logit > float("-inf")]

    def pick(self, ids: Sequence[int], logits) -> tuple[int, list[int]]:
        """(the token chosen after the response `ids` from its (vocabulary,) logits, the likelier tokens refused)."""
        likeliest = int(logits.argmax())
        if not self.token_may_break_a_rule(likeliest):
            return likeliest, []
        line_start = self._checked_line_start(ids)
        if line_start is None:
            return likeliest, []  # the step cannot write on a line a rule judges
        ranked = [likeliest] + [token for token in self._ranked(logits) if token != likeliest]
        for rank, token in enumerate(ranked):
            if self._follows(ids, token, line_start):
                self.replaced += rank > 0
                return token, ranked[:rank]
        self.unresolved += 1  # no candidate follows the rules: the likeliest stays, and the parse sees what it writes
        return likeliest, []

    def choose(self, responses: Sequence[Sequence[int]], logits):
        """The token ids (a long tensor) chosen for each row from its response so far and its (rows, vocabulary) logits."""
        import torch

        return torch.tensor([self.pick(ids, row)[0] for ids, row in zip(responses, logits)], dtype=torch.long, device=logits.device)

    def refuse(self, responses: Sequence[Sequence[int]], logits) -> list[list[int]]:
        """Sampled decoding: per row, the tokens among its `candidates` likeliest that would break a rule (the sampler draws
        from the others; a token outside them is not examined)."""
        refused = []
        for ids, row in zip(responses, logits):
            flagged = [token for token in self._ranked(row) if self.token_may_break_a_rule(token)]
            line_start = self._checked_line_start(ids) if flagged else None
            refused.append([] if line_start is None else [token for token in flagged if not self._follows(ids, token, line_start)])
            self.replaced += bool(refused[-1])
        return refused


def node_spans(text: str, graph: ReasoningGraph) -> dict[str, tuple[int, int]]:
    """Character span `[start, end)` of the first line of each node (`tag: ...` up to the newline).

    Lines are recognised by their tag alone (`qs: ...`), whatever the value, so a span exists for a
    node whose value is invalid; a node without a line has no span.
    """
    spans: dict[str, tuple[int, int]] = {}
    names = set(graph.node_names)
    start = 0
    for line in text.split("\n"):
        parts = _split_line(line)
        if parts is not None and parts[0] in names and parts[0] not in spans:
            spans[parts[0]] = (start, start + len(line))
        start += len(line) + 1
    return spans


def token_nodes(offsets: Sequence[tuple[int, int]], spans: Mapping[str, tuple[int, int]]) -> list[str | None]:
    """For each token (character offsets into the text), the node whose line it overlaps, or None.

    Tokens with an empty offset (special tokens) and tokens wholly inside separators map to None; a
    token that overlaps two lines (a merge across the newline) goes to the first one.
    """
    ordered = sorted(spans.items(), key=lambda item: item[1][0])
    result: list[str | None] = []
    for start, end in offsets:
        owner = None
        if end > start:
            for node, (line_start, line_end) in ordered:
                if start < line_end and end > line_start:
                    owner = node
                    break
        result.append(owner)
    return result


def node_correct(node_kind: str, predicted: str | None, gold: str) -> bool:
    """Whether a parsed node value equals the gold one (facets compared as key/value sets; None is wrong)."""
    if predicted is None:
        return False
    if node_kind == "facets":
        return parse_facets(predicted) == parse_facets(gold)
    return predicted == gold
