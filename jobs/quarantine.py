"""The one way a job writes the rows it rejects: QUARANTINE rows, on Spark or on Arrow.

Every job that rejects rows (validate, prepare, datasets, ingest, scoring) states why with the same
columns in the same order (`schemas.tables.QUARANTINE`) and the rejected row as one JSON object:
`quarantine_frame` builds them from a Spark frame, `quarantine_table` from Python rows.

Checks that reject rows are ordered `Rule`s: `first_failure` turns them into the `_reason` and
`_field` columns (null when every rule passes), the first failing rule naming the row's reason.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa

from schemas.tables import QUARANTINE

# Working columns of a checked frame: why a row is rejected and which field; null when it is not.
REASON = "_reason"
FIELD = "_field"


class Rule(NamedTuple):
    """One check: a row fails it where `failed` (a boolean Spark Column) is true."""

    failed: Any
    reason: str
    field: str


def first_failure(rules: Sequence[Rule], after_marked: bool = False):
    """(`_reason`, `_field`) Columns: those of the first rule a row fails, null when it fails none.

    `after_marked`: the frame already has `_reason` / `_field` from earlier checks; a row they mark
    keeps its reason and the rules only judge the others.
    """
    from pyspark.sql import functions as F

    reason = F.lit(None).cast("string")
    field = F.lit(None).cast("string")
    # A CASE chain built from the last rule up, so the first listed rule is tested first.
    for rule in reversed(rules):
        reason = F.when(rule.failed, F.lit(rule.reason)).otherwise(reason)
        field = F.when(rule.failed, F.lit(rule.field)).otherwise(field)
    if after_marked:
        marked = F.col(REASON).isNotNull()
        reason = F.when(marked, F.col(REASON)).otherwise(reason)
        field = F.when(marked, F.col(FIELD)).otherwise(field)
    return reason.alias(REASON), field.alias(FIELD)


# --- Spark ----------------------------------------------------------------------------------------


def record_json(*columns):
    """The Spark Column of a rejected row's record: the columns as one JSON object, nulls written."""
    from pyspark.sql import functions as F

    return F.to_json(F.struct(*columns), {"ignoreNullFields": "false"})


def _column(value, spark_type: str):
    """A Column as is; a Python value (None included) as a literal of `spark_type`."""
    from pyspark.sql import Column
    from pyspark.sql import functions as F

    return value if isinstance(value, Column) else F.lit(value).cast(spark_type)


def quarantine_frame(checked, source_table, quarantined_at: dt.datetime, record, source_file=None, row_number=None):
    """The rows of `checked` with a `_reason` -> QUARANTINE rows.

    `source_table` and `source_file` are a string (the same for every row) or a Column;
    `row_number` a Column (1-based) or None when unknown; `record` the row's JSON Column (`record_json`).
    """
    from pyspark.sql import functions as F

    columns = {
        "source_table": _column(source_table, "string"),
        "source_file": _column(source_file, "string"),
        "row_number": _column(row_number, "bigint").cast("bigint"),
        "field": F.col(FIELD),
        "reason": F.col(REASON),
        "record": record,
        "quarantined_at": F.lit(quarantined_at).cast("timestamp"),
    }
    rejected = checked.where(F.col(REASON).isNotNull())
    return rejected.select(*(columns[name].alias(name) for name in QUARANTINE.names))


# --- Arrow ----------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.date, dt.datetime, pd.Timestamp)):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _is_missing(value: Any) -> bool:
    return not isinstance(value, (list, tuple, dict, np.ndarray)) and bool(pd.isna(value))


def row_json(row: dict[str, Any] | list[Any]) -> str:
    """A rejected row (a mapping of field -> value, or the raw fields of an unparsable line) as JSON.

    Missing values (None, NaN, NaT) are null; dates are ISO 8601; numpy values are plain numbers.
    """
    if isinstance(row, dict):
        row = {key: (None if _is_missing(value) else value) for key, value in row.items()}
    return json.dumps(row, ensure_ascii=False, default=_json_default)


def _per_row(value: Any, rows: int) -> list[Any]:
    """A sequence as a list; anything else (a string, None, a number) repeated for every row."""
    if isinstance(value, (list, tuple, np.ndarray, pd.Series, pd.Index)):
        return list(value)
    return [value] * rows


def quarantine_table(
    source_table: str | Sequence[str],
    records: Sequence[dict[str, Any] | list[Any]],
    field: str | None | Sequence[str | None],
    reason: str | Sequence[str],
    quarantined_at: dt.datetime,
    source_file: str | None | Sequence[str | None] = None,
    row_number: int | None | Sequence[int | None] = None,
) -> pa.Table:
    """QUARANTINE rows for `records` (Python rows); every other argument is one value or one per row."""
    rows = len(records)
    columns = {
        "source_table": _per_row(source_table, rows),
        "source_file": _per_row(source_file, rows),
        "row_number": _per_row(row_number, rows),
        "field": _per_row(field, rows),
        "reason": _per_row(reason, rows),
        "record": [row_json(record) for record in records],
        "quarantined_at": [quarantined_at] * rows,
    }
    return pa.table({name: columns[name] for name in QUARANTINE.names}, schema=QUARANTINE.arrow_schema())
