"""Publish one validated night (`jobs/export.py`, step 4): data files, validation page, churn files, manifest, `_LATEST`.

Every file is written into a hidden staging folder renamed into place (`schemas.storage.replace_folder`),
the manifest last; `_LATEST` is rewritten after the rename with the newest published day.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.publishing.churn import write_churn
from jobs.publishing.validation import VALIDATION_PAGE
from schemas.graph import LabelSet
from schemas.sql import literal
from schemas.storage import replace_file, replace_folder
from schemas.tables import RELEVANCE

PARQUET_FILE = "relevance.parquet"
DUCKDB_FILE = "relevance.duckdb"
CSV_FILE = "relevance.csv"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "_LATEST"

# The published database of a Spark export: a view over the published parquet, not a copy of a large night. DuckDB
# binds a view when it is created, before the staging folder is swapped in: the variable `relevance_parquet` points
# it at the staging copy then (and lets a reader point it at a moved copy); unset, it reads the published path.
VIEW_VARIABLE = "relevance_parquet"
VIEW_SQL = "CREATE VIEW relevance AS SELECT * FROM read_parquet(coalesce(getvariable('relevance_parquet'), {path}))"
CSV_SQL = """
COPY (
    SELECT * REPLACE (
        to_json(label_probs) AS label_probs,
        to_json(node_decisions) AS node_decisions,
        strftime(scored_at, '%Y-%m-%dT%H:%M:%S.%fZ') AS scored_at
    ) FROM relevance
) TO {path} (FORMAT csv, HEADER true, DELIMITER ',', QUOTE '"', ESCAPE '"')
"""
# No record is longer than the file holding it, so that bound lets a cell of any size read back
# (DuckDB's default refuses lines over 2 MB, e.g. a long `reasoning`).
CSV_COUNT_SQL = """
SELECT count(*) FROM read_csv($path, header = true, all_varchar = true, quote = '"', escape = '"', max_line_size = $max_line_size)
"""


def sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_data_files(data: pa.Table, folder: Path, csv: bool = True) -> dict[str, int]:
    """relevance.parquet, relevance.duckdb and (when `csv`) relevance.csv under `folder`; rows read back from each."""
    import duckdb

    pq.write_table(data, folder / PARQUET_FILE)
    database = folder / DUCKDB_FILE
    with duckdb.connect(str(database)) as con:
        con.execute("SET TimeZone = 'UTC'")  # strftime renders scored_at in UTC for the CSV
        con.register("published_rows", data)
        con.execute("CREATE TABLE relevance AS SELECT * FROM published_rows")
        rows = {PARQUET_FILE: pq.read_metadata(folder / PARQUET_FILE).num_rows,
                DUCKDB_FILE: con.execute("SELECT count(*) FROM relevance").fetchone()[0]}
        if csv:
            csv_file = folder / CSV_FILE
            con.execute(CSV_SQL.format(path=literal(str(csv_file))))  # COPY takes no parameter
            rows[CSV_FILE] = con.execute(CSV_COUNT_SQL, {"path": str(csv_file), "max_line_size": csv_file.stat().st_size + 1}).fetchone()[0]
    wrong = {name: count for name, count in rows.items() if count != len(data)}
    if wrong:
        raise OSError(f"{folder}: files read back with {wrong} rows, {len(data)} were written")
    return rows


def write_data_files_spark(frame, folder: Path, final: Path, rows: int, csv: bool) -> dict[str, int]:
    """relevance.parquet (a folder of part files, written by Spark's executors), relevance.duckdb (a database whose view
    `relevance` reads that parquet where it is published: `final`, no second copy) and, when `csv`, relevance.csv
    (written by DuckDB from the parquet); rows read back from each (the view through the staging copy)."""
    import duckdb

    frame.write.mode("overwrite").parquet(str(folder / PARQUET_FILE))
    counts = {PARQUET_FILE: sum(pq.read_metadata(part).num_rows for part in parquet_parts(folder / PARQUET_FILE))}
    with duckdb.connect(str(folder / DUCKDB_FILE)) as con:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"SET VARIABLE {VIEW_VARIABLE} = $path", {"path": str(folder / PARQUET_FILE / "*.parquet")})
        con.execute(VIEW_SQL.format(path=literal(str(final / PARQUET_FILE / "*.parquet"))))
        counts[DUCKDB_FILE] = con.execute("SELECT count(*) FROM relevance").fetchone()[0]
        if csv:
            csv_file = folder / CSV_FILE
            con.execute(CSV_SQL.format(path=literal(str(csv_file))))
            counts[CSV_FILE] = con.execute(CSV_COUNT_SQL, {"path": str(csv_file), "max_line_size": csv_file.stat().st_size + 1}).fetchone()[0]
    wrong = {name: count for name, count in counts.items() if count != rows}
    if wrong:
        raise OSError(f"{folder}: files read back with {wrong} rows, {rows} were written")
    return counts


def parquet_parts(path: Path) -> list[Path]:
    """The data files of a parquet file or of a folder of part files (Spark's `_SUCCESS` and hidden checksums left out)."""
    if path.is_file():
        return [path]
    return sorted(part for part in path.iterdir() if part.is_file() and not part.name.startswith(("_", ".")))


def label_counts(data: pa.Table) -> list[dict]:
    """Rows per (model_name, model_version, label_set, label) of `data`, as `models_summary` takes them."""
    return data.group_by(["model_name", "model_version", "label_set", "label"]).aggregate([("label", "count")]).to_pylist()


def models_summary(counts: list[dict], label_sets: dict[str, LabelSet]) -> list[dict]:
    """Per (model_name, model_version, label_set): rows and the count of each label (label-set order), from the
    rows per label (`label_count`) of each."""
    keys = ["model_name", "model_version", "label_set"]
    models: dict[tuple, dict] = {}
    for row in sorted(counts, key=lambda r: tuple(r[k] for k in keys)):
        key = tuple(row[k] for k in keys)
        if key not in models:
            names = label_sets[row["label_set"]].names
            models[key] = {**dict(zip(keys, key)), "rows": 0, "label_counts": dict.fromkeys(names, 0)}
        models[key]["rows"] += row["label_count"]
        models[key]["label_counts"][row["label"]] = row["label_count"]
    return list(models.values())


def published_days(root: Path) -> list[dt.date]:
    """Days fully published under `<out>/relevance` (a manifest is the last file a publish writes)."""
    complete = [folder for folder in root.glob("ds=*") if (folder / MANIFEST_FILE).is_file()]
    return sorted(dt.date.fromisoformat(folder.name[3:]) for folder in complete)


def write_latest(root: Path) -> str:
    """Point `_LATEST` at the newest published day (temp file + atomic replace); returns that day."""
    newest = max(published_days(root)).isoformat()
    replace_file(root / LATEST_FILE, lambda staging: staging.write_text(newest + "\n"))
    return newest


def latest_published_day(root: Path) -> dt.date | None:
    """The day `_LATEST` names, when its folder is complete; else the newest complete day (None: none is).

    `_LATEST` can name a missing folder: while that day is re-exported, for the instant between the two
    renames of `replace_folder`, or after a run killed there until the next export restores it.
    """
    try:
        named = dt.date.fromisoformat((root / LATEST_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        named = None
    if named is not None and (root / f"ds={named.isoformat()}" / MANIFEST_FILE).is_file():
        return named
    days = published_days(root)
    return days[-1] if days else None


def read_published(root: Path, day: dt.date | None = None) -> pa.Table:
    """The rows published for `day` under `root` (`<out>/relevance`); by default the latest complete day."""
    if day is None:
        day = latest_published_day(root)
        if day is None:
            raise FileNotFoundError(f"{root}: no day is published yet (no ds=*/{MANIFEST_FILE})")
    return pq.read_table(root / f"ds={day.isoformat()}" / PARQUET_FILE, schema=RELEVANCE.arrow_schema())


def manifest_of(
    folder: Path, total: int, day: dt.date, source: str, rows: dict[str, int], report_files: list[str],
    models: list[dict], validation: dict, churn: dict,
) -> dict[str, Any]:
    """manifest.json of a partition of `total` rows whose other files are written under `folder` (a folder of part
    files is listed file by file)."""
    files = {}
    for name in [*rows, *report_files]:
        parts = parquet_parts(folder / name) if (folder / name).is_dir() else [folder / name]
        for part in parts:
            files[str(part.relative_to(folder))] = {**({"rows": rows[name]} if name in rows and part == folder / name else {}),
                                                     "bytes": part.stat().st_size, "sha256": sha256_of(part)}
    return {
        "table": RELEVANCE.name,
        "schema_version": RELEVANCE.version,
        "ds": day.isoformat(),
        "rows": total,
        "source": source,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(),
        "files": files,
        "data_files": rows,
        "models": models,
        "validation": validation,
        "churn": {
            "previous_ds": churn["previous_ds"],
            "label_changed_share": {name: m["label_changed"]["share"] for name, m in churn["models"].items()},
            "model_version_changed": {name: m["model_version_changed"] for name, m in churn["models"].items()},
        },
    }


def publish_partition(
    root: Path, day: dt.date, write_data: Callable[[Path, Path], dict[str, int]], total: int, models: list[dict], source: str,
    validation: dict, validation_page: str, churn: dict,
) -> tuple[Path, dict[str, Any]]:
    """Write the day's files into a staging folder, manifest last, and swap it in as `root/ds=D`.

    `write_data(staging, final)`: writes the data files (`write_data_files`, `write_data_files_spark`), returns the rows
    read back from each; `total`: the rows they hold; `models`: `models_summary`; `validation`: the suite's summary for
    the manifest; `validation_page`: validation.html. Returns the published folder and the manifest.
    """
    manifest: dict[str, Any] = {}
    final = root / f"ds={day.isoformat()}"

    def write(folder: Path) -> None:
        rows = write_data(folder, final)
        (folder / VALIDATION_PAGE).write_text(validation_page)
        report_files = [VALIDATION_PAGE, *write_churn(churn, folder)]
        manifest.update(manifest_of(folder, total, day, source, rows, report_files, models, validation, churn))
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, allow_nan=False))

    return replace_folder(final, write), manifest
