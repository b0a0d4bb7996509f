"""Label test pairs of a demo root with trained policies, as written and under checked decoding, and score
them all against the noise-free gold in one `relevance evaluate` run (paired query-bootstrap comparisons with the first).

    .venv/bin/python benchmarks/relabel.py --root DEMO --out WORK [--pairs 2000] [--decoding plain checked]
        [--batch-size 256] NAME=POLICY_DIR [NAME=STUDENT_DIR] [NAME=@RELEVANCE_TABLE ...]

Each NAME=POLICY_DIR is labelled once per `--decoding` (checked tables are named NAME_checked) into WORK/models; a
distilled student's folder (it holds student.json) once, by its heads; a NAME=@TABLE is a relevance table labelled
before, evaluated as it is. The first labeller is the baseline. The pairs are
DEMO/datasets' test split, whole queries as `training.examples.whole_queries` samples them (what `make demo` and
benchmarks/credit_assignment.py label), the gold the world's nodes of the labelled pairs (WORK/evaluation_gold: not the
demo's own, which holds the pairs its version sampled); the report is WORK/evaluation (report.md, metrics.json). Nothing
is trained, so a policy labelled twice labels the same.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.command import EvaluateConfig, run  # noqa: E402
from evaluation.inputs import rows_on_pairs  # noqa: E402
from schemas.storage import read_table, write_table  # noqa: E402
from schemas.tables import GOLD_NODES, RELEVANCE  # noqa: E402
from training import student  # noqa: E402
from training.policy_format import STUDENT_FILE  # noqa: E402
from training.predict import score_split  # noqa: E402

DECODINGS = ("plain", "checked")


def write_scored_gold(predictions: Path, world: Path, target: Path) -> Path:
    """The world's gold nodes of the pairs the relevance table `predictions` labelled, written to `target`."""
    write_table(GOLD_NODES, rows_on_pairs(read_table(GOLD_NODES, world), read_table(RELEVANCE, predictions)), target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="demo root: datasets/, world/")
    parser.add_argument("--out", type=Path, required=True, help="work folder: models/ (one relevance table each), evaluation/")
    parser.add_argument("--pairs", type=int, default=2000, help="test pairs labelled (whole queries, training.examples.whole_queries)")
    parser.add_argument("--decoding", nargs="+", choices=DECODINGS, default=list(DECODINGS))
    parser.add_argument("--batch-size", type=int, default=256, help="prompts a policy decodes at once (a student scores 64 pairs at once, its own default)")
    parser.add_argument("labellers", nargs="+", metavar="NAME=POLICY_DIR|NAME=STUDENT_DIR|NAME=@TABLE")
    args = parser.parse_args()
    tables = {}

    def keep(label: str, rows) -> None:
        write_table(RELEVANCE, rows, args.out / "models" / label)
        tables[label] = str(args.out / "models" / label)

    for spec in args.labellers:
        name, equals, folder = spec.partition("=")
        if not (name and equals and folder):
            parser.error(f"{spec!r}: write NAME=POLICY_DIR, NAME=STUDENT_DIR or NAME=@RELEVANCE_TABLE")
        if folder.startswith("@"):
            tables[name] = folder[1:]
            continue
        if (Path(folder) / STUDENT_FILE).exists():
            keep(name, student.score_split(folder, args.root / "datasets", "test", model_name=name, max_pairs=args.pairs))
            continue
        for decoding in args.decoding:
            label = f"{name}_checked" if decoding == "checked" else name
            keep(label, score_split(Path(folder), args.root / "datasets", "test", reasoning="all", model_name=label, max_pairs=args.pairs,
                                    batch_size=args.batch_size, checked_verdicts=decoding == "checked"))
    gold = write_scored_gold(Path(next(iter(tables.values()))), args.root / "world", args.out / "evaluation_gold")
    run(EvaluateConfig(predictions=tables, baseline=next(iter(tables)), gold_source="nodes", gold_nodes=str(gold),
                       queries=str(args.root / "world"), catalog=str(args.root / "world"), label_set="wands", out=str(args.out / "evaluation")))
    print(f"wrote {args.out / 'evaluation' / 'report.md'}")


if __name__ == "__main__":
    main()
