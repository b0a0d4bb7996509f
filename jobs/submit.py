"""The `spark-submit` entry point: `spark-submit jobs/submit.py JOB [--config FILE] [--set key=value ...]`.

The master and resources come from spark-submit (`--master yarn|k8s://...|spark://...`); the job's
session builder (`jobs.spark.get_spark`) keeps them. Ship the code with `--py-files` (a zip of
`schemas/` and `jobs/`, or the built wheel) and point `data`/`out` at storage every executor reads.

    spark-submit --master yarn --py-files relevance.zip jobs/submit.py prepare \\
        --set date=2024-03-03 --set data=hdfs:///relevance/world --set out=hdfs:///relevance/prepared

Scoring on GPU executors (one engine per GPU, see jobs/scoring/spark.py for the resource settings):

    spark-submit --master yarn --py-files relevance.zip --conf spark.executor.resource.gpu.amount=1 \
        --conf spark.task.resource.gpu.amount=1 jobs/submit.py score --set engine=spark --set backend=vllm \
        --set date=2024-03-03 --set model=/shared/models/policy --set pairs=hdfs:///relevance/prepared ...
"""

from __future__ import annotations

import argparse

from schemas.config import load_config
from schemas.logs import setup

JOBS = {
    "prepare": ("jobs.prepare", "PrepareConfig"),
    "datasets": ("jobs.datasets", "DatasetsConfig"),
    "score": ("jobs.scoring.run", "ScoreConfig"),
    "nightly": ("jobs.nightly", "NightlyConfig"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one relevance job under spark-submit.")
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("--config", help="YAML config file for the job.")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key=value override; repeatable.")
    args = parser.parse_args(argv)
    setup()  # the driver's log as `relevance` would write it (spark-submit's stderr is rarely a terminal: timestamped lines)
    module_name, config_name = JOBS[args.job]
    module = __import__(module_name, fromlist=[config_name])
    module.run(load_config(getattr(module, config_name), args.config, args.sets))


if __name__ == "__main__":
    main()
