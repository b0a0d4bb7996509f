"""Validation of a CoT policy by greedy decoding, used by SFT and GRPO.

Metrics: strict parse rate (exact lines then EOS), label accuracy and macro-F1 (an unparsed label
counts as wrong; macro-F1 is the project's one definition, `evaluation.metrics.label_scores`),
per-node accuracy, lenient label accuracy; beside them the majority-class baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

from evaluation.metrics import label_scores
from schemas.graph import LabelSet, ReasoningGraph
from training.cot import node_correct, parse_cot
from training.distributed import SINGLE_PROCESS, Parallel, gathered_map
from training.examples import Example


def cot_metrics(
    generations: Sequence[tuple[str, bool]], golds: Sequence[dict[str, str]], graph: ReasoningGraph, order: str, labels: LabelSet
) -> dict[str, float]:
    """Metrics of generated CoTs (text without EOS, whether EOS was emitted) against gold node values."""
    n = len(generations)
    if n == 0:
        raise ValueError("cot_metrics: no generations")
    strict = [parse_cot(text, graph, order, labels.names, "strict") for text, _ in generations]
    lenient = [parse_cot(text, graph, order, labels.names, "lenient") for text, _ in generations]
    y = graph.label_node
    gold_labels = [gold[y] for gold in golds]
    predicted = [parsed.get(y) or "<none>" for parsed in strict]
    metrics = {
        "n": float(n),
        "parse_rate": sum(p.well_formed and eos for p, (_, eos) in zip(strict, generations)) / n,
        "label_accuracy": sum(p == g for p, g in zip(predicted, gold_labels)) / n,
        "label_macro_f1": float(label_scores(gold_labels, predicted, labels.names).macro_f1),
        "label_accuracy_lenient": sum(p.get(y) == g for p, g in zip(lenient, gold_labels)) / n,
    }
    for node in graph.node_names:
        kind = graph.node(node).kind
        metrics[f"node_accuracy/{node}"] = sum(node_correct(kind, p.get(node), g[node]) for p, g in zip(strict, golds)) / n
    return metrics


def majority_baseline(train_labels: Sequence[str], val_labels: Sequence[str], labels: LabelSet) -> dict:
    """Scores of predicting the train split's most frequent label (ties: label set order) for every val pair."""
    majority = max(labels.names, key=lambda name: sum(label == name for label in train_labels))
    return {
        "label": majority,
        "label_accuracy": sum(label == majority for label in val_labels) / len(val_labels),
        "label_macro_f1": float(label_scores(val_labels, [majority] * len(val_labels), labels.names).macro_f1),
    }


def evaluate(model, tokenizer, examples: Sequence[Example], graph: ReasoningGraph, order: str, labels: LabelSet,
             max_new_tokens: int, batch_size: int, parallel: Parallel = SINGLE_PROCESS, chooser=None) -> dict[str, float]:
    """`cot_metrics` of the model's greedy CoTs for the examples' prompts (progress shown by the first process). In a
    run of several processes each decodes a share of the examples and every one gets the metrics of all. `chooser`:
    `training.decoding.generate`'s (checked decoding: `training.cot.CheckedVerdicts`), None for plain greedy."""
    from training.decoding import generate

    def decode(share: list[Example]) -> list[tuple[str, bool]]:
        generations = generate(model, tokenizer, [e.prompt_ids for e in share], max_new_tokens=max_new_tokens, batch_size=batch_size,
                               synced=parallel.sharded, progress="validate" if parallel.is_main else None, chooser=chooser)
        return list(zip(generations.texts, generations.ended))

    return cot_metrics(gathered_map(parallel, examples, decode), [e.gold for e in examples], graph, order, labels)
