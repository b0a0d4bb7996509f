"""The counts of datasets.json, from the grouped rows of a datasets run, and their console lines."""

from __future__ import annotations

from collections import Counter

from jobs.training_data.labels import ORIGIN, SUPERSEDED, WEAK_ENGAGED, WEAK_IGNORED
from jobs.training_data.splits import HELD_OUT
from schemas.tables import JUDGMENTS, QUERY_PRODUCT_STATS

NULL_SEGMENT = "null"  # the JSON key of the null-segment stratum


def _segment_key(segment: str | None) -> str:
    return NULL_SEGMENT if segment is None else segment


def _nested(counter: Counter) -> dict:
    """{(a, b, c): n} -> {a: {b: {c: n}}}, keys sorted."""
    result: dict = {}
    for keys, count in sorted(counter.items()):
        node = result
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = count
    return result



def _example_counts(tally) -> tuple[Counter, Counter, Counter]:
    """(examples by split x segment x label, weak examples by split x segment x rule x label, totals)."""
    examples, weak_examples, totals = Counter(), Counter(), Counter()
    for row in tally:
        n, segment = row["count"], _segment_key(row["segment"])
        from_judgments = row[ORIGIN] == JUDGMENTS.name
        if row[HELD_OUT]:
            totals["weak_held_out_" + ("judgments" if from_judgments else "stats")] += n
            continue
        if row["is_weak"]:
            weak_examples[(row["split"], segment, row["weak_source"], row["label"])] += n
        else:
            examples[(row["split"], segment, row["label"])] += n
        totals["written"] += n
        totals["written_from_judgments"] += n * from_judgments
        totals["written_from_stats"] += n * (not from_judgments)
        totals["with_target"] += n * row["has_target"]
        totals["judged_without_gold_nodes"] += n * (not row["is_weak"] and not row["has_gold"])
        totals["gold_nodes_invalid"] += n * (row["has_gold"] and not row["has_target"])
        totals["label_differs_from_gold_y"] += n * row["y_differs"]
        totals["pairs_judged_several_times"] += n * row["several"]
        totals["pairs_with_disagreeing_judgments"] += n * row["disagree"]
    return examples, weak_examples, totals


def _query_counts(query_counts) -> tuple[Counter, Counter]:
    """(judged queries, weak-only queries), each by segment x split."""
    queries, weak_only_queries = Counter(), Counter()
    for row in query_counts:
        segment = _segment_key(row["segment"])
        queries[(segment, row["split"])] += row["judged_queries"]
        if row["queries"] > row["judged_queries"]:
            weak_only_queries[(segment, row["split"])] += row["queries"] - row["judged_queries"]
    return queries, weak_only_queries


def _judgments_counts(judgments_in: int, other_label_sets: int, totals: Counter, quarantined: Counter,
                      by_reason: Counter) -> dict:
    """Where the judgments went; raises when they do not reconcile."""
    judgments = {
        "rows_in": judgments_in,
        "written": totals["written_from_judgments"],
        "quarantined": quarantined[JUDGMENTS.name],
        "other_label_sets": other_label_sets,
        "weak_held_out": totals["weak_held_out_judgments"],
        "duplicates": {
            "pairs_judged_several_times": totals["pairs_judged_several_times"],
            "rows_superseded": by_reason[(JUDGMENTS.name, SUPERSEDED)],
            "pairs_with_disagreeing_judgments": totals["pairs_with_disagreeing_judgments"],
        },
    }
    if judgments_in != sum(judgments[key] for key in ("written", "quarantined", "other_label_sets", "weak_held_out")):
        raise AssertionError(f"judgments do not reconcile: {judgments}")
    return judgments


def _weak_label_counts(weak_counts: dict, totals: Counter, quarantined: Counter) -> dict:
    """Where the weak labels went; raises when they do not reconcile."""
    labelled = {rule: sum(n for (a, judged), n in weak_counts.items() if a == rule and not judged)
                for rule in (WEAK_ENGAGED, WEAK_IGNORED)}
    weak = {
        "pairs": sum(weak_counts.values()),
        "judged_pairs_skipped": sum(n for (_, judged), n in weak_counts.items() if judged),
        "no_rule_fired": sum(n for (a, judged), n in weak_counts.items() if a is None and not judged),
        "labelled": labelled,
        "written": totals["written_from_stats"],
        "held_out": totals["weak_held_out_stats"],
        "quarantined": quarantined[QUERY_PRODUCT_STATS.name],
    }
    if sum(labelled.values()) != weak["written"] + weak["held_out"] + weak["quarantined"]:
        raise AssertionError(f"weak labels do not reconcile: {weak}")
    return weak


def summarise(tally, query_counts, by_reason: Counter, judgments_in: int, other_label_sets: int,
              weak_counts: dict | None) -> dict:
    """The counts of datasets.json from the tally rows; raises when the judgments do not reconcile."""
    examples, weak_examples, totals = _example_counts(tally)
    queries, weak_only_queries = _query_counts(query_counts)
    quarantined = Counter()
    for (source, _), count in by_reason.items():
        quarantined[source] += count
    return {
        "examples": _nested(examples),
        "weak_examples": _nested(weak_examples),
        "queries": _nested(queries),
        "weak_only_queries": _nested(weak_only_queries),
        "judgments": _judgments_counts(judgments_in, other_label_sets, totals, quarantined, by_reason),
        "weak": None if weak_counts is None else _weak_label_counts(weak_counts, totals, quarantined),
        "targets": {
            "with_target": totals["with_target"],
            "judged_without_gold_nodes": totals["judged_without_gold_nodes"],
            "gold_nodes_invalid": totals["gold_nodes_invalid"],
            "label_differs_from_gold_y": totals["label_differs_from_gold_y"],
        },
        "written": totals["written"],
        "quarantined": {
            source: {reason: n for (s, reason), n in sorted(by_reason.items()) if s == source}
            for source in sorted(quarantined)
        },
    }


def summary_lines(summary: dict) -> list[str]:
    """A few lines for the console."""
    j = summary["judgments"]
    lines = [
        (
            f"judgments: {j['rows_in']} in = {j['written']} written + {j['quarantined']} quarantined + "
            f"{j['other_label_sets']} of other label sets + {j['weak_held_out']} weak held out; "
            f"{j['duplicates']['rows_superseded']} duplicates superseded"
        ),
    ]
    for segment, splits in summary["queries"].items():
        lines.append(f"queries {segment}: " + ", ".join(f"{split} {n}" for split, n in splits.items()))
    t = summary["targets"]
    lines.append(f"targets: {t['with_target']} rendered, {t['gold_nodes_invalid']} invalid gold nodes, "
                 f"{t['label_differs_from_gold_y']} judged labels differ from gold y")
    if summary["weak"] is not None:
        w = summary["weak"]
        lines.append(f"weak: {sum(w['labelled'].values())} labelled = {w['written']} written + "
                     f"{w['held_out']} held out "
                     f"+ {w['quarantined']} quarantined ({w['judged_pairs_skipped']} judged pairs skipped)")
    return lines
