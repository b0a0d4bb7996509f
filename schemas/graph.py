"""The reasoning graph and label sets, declared as data (YAML) and loaded into typed objects.

A graph file lists nodes (name, kind, vocabulary for `choice` nodes), dependency edges and the CoT
orders; `ReasoningGraph.digraph()` gives the networkx DiGraph the credit computation walks. A label
set lists labels with gains and the rule that derives a gold label from the decision nodes.
Users declare another graph or label set in their own file and pass its path wherever a name is
accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import networkx as nx
import yaml

_HERE = Path(__file__).parent
NODE_KINDS = ("text", "facets", "choice", "label")
LABEL_KEYS = {"name", "gain", "description"}
FACETS_NONE = "none"
NO_VALUE = "-"  # in an attribute check: the product has no value for the constrained key
# The graph the project's commands default to: relevance7 with the attribute checks written out (`ac`), which a
# small policy learns where it does not learn relevance7's ma (benchmarks/results/quality.md).
DEFAULT_GRAPH = "relevance8"


def resolve_yaml(name_or_path: str | Path, folder: str, what: str) -> Path:
    """The YAML file a name or path means: a path ending in .yaml/.yml as it is, else the bundled `<folder>/<name>.yaml`."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {path} does not exist")
        return path
    bundled = _HERE / folder / f"{name_or_path}.yaml"
    if not bundled.is_file():
        known = sorted(p.stem for p in (_HERE / folder).glob("*.yaml"))
        raise ValueError(f"unknown {what} {name_or_path!r}: use one of {known} or a path to a .yaml file")
    return bundled


def _require(mapping: dict, key: str, where: str):
    if key not in mapping:
        raise ValueError(f"{where}: missing required key {key!r}")
    return mapping[key]


@dataclass(frozen=True)
class Node:
    name: str
    kind: str
    description: str = ""
    values: tuple[str, ...] = ()
    # a choice node's value written exactly when its parents' values are the same text (relevance8's ms: match, the
    # product's subject being the query's): a rule checked decoding applies (training.cot.CheckedRules)
    equal_parents: str | None = None


@dataclass(frozen=True)
class ReasoningGraph:
    """Nodes, dependency edges (reasoning order) and the CoT orders of one graph."""

    name: str
    nodes: tuple[Node, ...]
    edges: tuple[tuple[str, str], ...]
    label_node: str
    orders: dict[str, tuple[str, ...]]
    # the facets node whose values are `attribute_checks` text, where checked decoding computes each yes/no (optional)
    checks_node: str | None = None

    def __post_init__(self) -> None:
        names = [node.name for node in self.nodes]
        where = f"graph {self.name!r}"
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: duplicate node names in {names}")
        for node in self.nodes:
            if node.kind not in NODE_KINDS:
                raise ValueError(f"{where}: node {node.name!r} has kind {node.kind!r}; use one of {NODE_KINDS}")
            if node.kind == "choice" and not node.values:
                raise ValueError(f"{where}: choice node {node.name!r} needs a `values` list")
        if self.label_node not in names:
            raise ValueError(f"{where}: label_node {self.label_node!r} is not a node")
        for source, target in self.edges:
            for end in (source, target):
                if end not in names:
                    raise ValueError(f"{where}: edge {source}->{target} names unknown node {end!r}")
        graph = nx.DiGraph(self.edges)
        graph.add_nodes_from(names)
        if not nx.is_directed_acyclic_graph(graph):
            raise ValueError(f"{where}: edges contain a cycle {nx.find_cycle(graph)}")
        for node in self.nodes:
            if node.equal_parents is not None and (node.kind != "choice" or node.equal_parents not in node.values
                                                   or graph.in_degree(node.name) < 2):
                raise ValueError(f"{where}: node {node.name!r}: equal_parents {node.equal_parents!r} must be one of the values of a "
                                 "choice node with two parents or more")
        if self.checks_node is not None and (self.checks_node not in names or self.node(self.checks_node).kind != "facets"):
            raise ValueError(f"{where}: checks_node {self.checks_node!r} must name a facets node")
        if graph.out_degree(self.label_node) != 0:
            raise ValueError(f"{where}: the label node {self.label_node!r} must have no outgoing edges")
        for order_name, order in self.orders.items():
            if sorted(order) != sorted(names):
                raise ValueError(f"{where}: order {order_name!r} must list every node once, got {list(order)}")

    @classmethod
    def load(cls, name_or_path: str | Path = DEFAULT_GRAPH) -> ReasoningGraph:
        path = resolve_yaml(name_or_path, "graphs", "graph")
        raw = yaml.safe_load(path.read_text())
        where = str(path)
        nodes = tuple(
            Node(
                name=_require(item, "name", where),
                kind=_require(item, "kind", where),
                description=item.get("description", ""),
                values=tuple(item.get("values", ())),
                equal_parents=item.get("equal_parents"),
            )
            for item in _require(raw, "nodes", where)
        )
        return cls(
            name=_require(raw, "name", where),
            nodes=nodes,
            edges=tuple((str(a), str(b)) for a, b in _require(raw, "edges", where)),
            label_node=_require(raw, "label_node", where),
            orders={key: tuple(value) for key, value in _require(raw, "orders", where).items()},
            checks_node=raw.get("checks_node"),
        )

    @property
    def node_names(self) -> list[str]:
        return [node.name for node in self.nodes]

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"graph {self.name!r} has no node {name!r}; nodes: {self.node_names}")

    def order(self, name: str) -> tuple[str, ...]:
        try:
            return self.orders[name]
        except KeyError:
            raise ValueError(f"graph {self.name!r} has no order {name!r}; orders: {sorted(self.orders)}") from None

    def label_comes_first(self, order: str) -> bool:
        """Whether the named order writes the label before any reasoning (scoring then needs no generation)."""
        return self.order(order)[0] == self.label_node

    def digraph(self) -> nx.DiGraph:
        """A fresh networkx DiGraph with node attributes `kind`, `values`, `description`."""
        graph = nx.DiGraph()
        for node in self.nodes:
            graph.add_node(node.name, kind=node.kind, values=node.values, description=node.description)
        graph.add_edges_from(self.edges)
        return graph

    @cached_property
    def credit_order(self) -> list[str]:
        """Nodes in reverse topological order: the label first, evidence last (credit flows this way)."""
        return list(reversed(list(nx.lexicographical_topological_sort(self.digraph()))))

    @property
    def decision_nodes(self) -> list[str]:
        """Nodes with a closed vocabulary (`choice`), apart from the label."""
        return [node.name for node in self.nodes if node.kind == "choice"]


@dataclass(frozen=True)
class Label:
    name: str
    gain: float
    description: str = ""


@dataclass(frozen=True)
class LabelSet:
    """Ordered labels (best first) with gains, and the rule from decision nodes to a gold label."""

    name: str
    labels: tuple[Label, ...]
    relevant: tuple[str, ...]
    rule: tuple[tuple[dict[str, tuple[str, ...]], str], ...]

    def __post_init__(self) -> None:
        names = self.names
        where = f"label set {self.name!r}"
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: duplicate labels in {names}")
        unknown = [label for label in self.relevant if label not in names]
        unknown += [label for _, label in self.rule if label not in names]
        if unknown:
            raise ValueError(f"{where}: unknown labels {unknown}; labels are {names}")

    @classmethod
    def load(cls, name_or_path: str | Path) -> LabelSet:
        path = resolve_yaml(name_or_path, "labelsets", "label set")
        raw = yaml.safe_load(path.read_text())
        where = str(path)
        items = _require(raw, "labels", where)
        for item in items:
            unknown = sorted(set(item) - LABEL_KEYS)
            if unknown:  # e.g. `{description: exact, the product ...}`: a comma in a flow mapping starts another key
                raise ValueError(f"{where}: label {item.get('name')!r} has unknown keys {unknown}; a label has {sorted(LABEL_KEYS)} "
                                 "(quote a description that holds a comma)")
        labels = tuple(
            Label(_require(item, "name", where), float(_require(item, "gain", where)), item.get("description", ""))
            for item in items
        )
        rule = []
        for clause in raw.get("rule", ()):
            label = _require(clause, "label", where)
            conditions = {
                node: tuple(values) if isinstance(values, list) else (values,)
                for node, values in clause.items()
                if node != "label"
            }
            rule.append((conditions, label))
        return cls(
            name=_require(raw, "name", where),
            labels=labels,
            relevant=tuple(raw.get("relevant", ())),
            rule=tuple(rule),
        )

    @property
    def names(self) -> list[str]:
        return [label.name for label in self.labels]

    @property
    def gains(self) -> dict[str, float]:
        return {label.name: label.gain for label in self.labels}

    def index(self, label: str) -> int:
        try:
            return self.names.index(label)
        except ValueError:
            raise ValueError(f"{label!r} is not a label of {self.name!r}; labels are {self.names}") from None

    def label_from_nodes(self, decisions: dict[str, str]) -> str:
        """The gold label for the given decision-node values (first matching rule clause)."""
        for conditions, label in self.rule:
            if all(decisions.get(node) in allowed for node, allowed in conditions.items()):
                return label
        raise ValueError(f"label set {self.name!r}: no rule clause covers decisions {decisions}")


def format_facets(facets: dict[str, str]) -> str:
    """`key=value; key=value` sorted by key, or `none`: the text of a facets node."""
    if not facets:
        return FACETS_NONE
    return "; ".join(f"{key}={value}" for key, value in sorted(facets.items()))


def attribute_match(wanted: Mapping[str, str], offered: Mapping[str, str]) -> str:
    """The `ma` rule of relevance7: none without constraints, match when the product has every wanted value,
    partial when some, mismatch when none (a product lacking the key does not satisfy it)."""
    if not wanted:
        return "none"
    satisfied = sum(offered.get(key) == value for key, value in wanted.items())
    return "match" if satisfied == len(wanted) else ("partial" if satisfied else "mismatch")


def attribute_checks(wanted: Mapping[str, str], offered: Mapping[str, str]) -> str:
    """The `ac` text of relevance8: each wanted key as `key=wanted/offered:yes|no` (the product's value of the key, `-`
    without one; yes when the two are the same, the test `attribute_match` counts), in `format_facets` form; `none` without
    constraints. The product's value is written out so that the verdict compares two neighbouring values: a small
    policy copies a value found by its key readily, and fails to compare values that stand apart (quality.md)."""
    return format_facets({key: f"{value}/{offered.get(key, NO_VALUE)}:{'yes' if offered.get(key) == value else 'no'}"
                          for key, value in wanted.items()})


def check_verdict(values: str) -> str:
    """The verdict `attribute_checks` writes after a check's `wanted/offered`: yes when they are the same, that is when
    the text is one value on both sides of its middle slash (so `1/2` against `1/2` is read right), other than `NO_VALUE`
    (a product without the key satisfies nothing) and not empty. The one misreading: a text that is also one value
    twice, as `/-/` against no value writes `/-//-`, reads yes; `wanted/offered` cannot tell the two apart."""
    middle = len(values) // 2
    same = len(values) % 2 and values[middle] == "/" and values[:middle] == values[middle + 1 :] not in ("", NO_VALUE)
    return "yes" if same else "no"


def parse_facets(text: str) -> dict[str, str] | None:
    """Inverse of `format_facets`; None when the text is not in that format."""
    text = text.strip()
    if text == FACETS_NONE:
        return {}
    facets: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.strip().partition("=")
        if not sep or not key.strip() or not value.strip() or key.strip() in facets:
            return None
        facets[key.strip()] = value.strip()
    return facets
