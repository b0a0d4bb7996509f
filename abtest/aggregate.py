"""From event logs to sufficient statistics, in DuckDB.

Steps (one DuckDB connection, temporary tables):
1. Read `experiment_assignment` and `experiment_events` with their declared schemas (a data root,
   a table folder, a parquet file, a DuckDB database, an Arrow/pandas table or a DuckDB relation).
2. Check rows: the tables' row rules (nulls, allowed values, negative counts), users assigned to
   more than one variant, repeated assignment rows, repeated request ids, experiment-period events
   of users without an assignment and events before a user's first exposure. Every rejected row
   goes to the quarantine table with its reason; counts reconcile (rows in = used + quarantined
   + pre-period rows of users outside the experiment).
3. Per user: each metric's values in the experiment period (ds >= start) and in the pre-period
   (ds < start, the CUPED covariates); also per user and query segment and per user and day since
   first exposure. Every assigned user is a row of the overall slice (zeros when inactive).
4. Winsorisation (optional): upper caps at a quantile of the pooled per-user values. A ratio
   metric's numerator and denominator are scaled by one factor per user
   (min(1, cap_num / num, cap_den / den)), so the user's ratio is kept and both parts are capped
   over the same users; a mean is capped at its quantile.
5. Per variant (and segment, day): n, the sums and the sums of products of each metric's columns
   (`SuffStats`). Only these leave this module.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from abtest.metrics import Metric, UserValue
from abtest.stats import SuffStats
from schemas import storage
from schemas.sql import identifier, literal
from schemas.table import Table
from schemas.tables import EXPERIMENT_ASSIGNMENT, EXPERIMENT_EVENTS, QUARANTINE

# Slice kinds of the per-user table and the names of the per-metric columns in `SuffStats`.
ALL, QUERY_SEGMENT, USER_TYPE, DAY = "all", "query_segment", "user_type", "day"
NUM, DEN, COV_NUM, COV_DEN = "num", "den", "cov_num", "cov_den"
ACTIVE = "__active"  # per-user requests in the experiment period (for active-user counts)
DUCKDB_SUFFIXES = (".duckdb", ".db", ".ddb")

Source = Any  # str | Path | pa.Table | pandas.DataFrame | duckdb.DuckDBPyRelation


def column(metric: str, part: str) -> str:
    """The `SuffStats` column of one part (NUM, DEN, COV_NUM, COV_DEN) of a metric."""
    return f"{metric}__{part}"


class InputError(ValueError):
    """The input tables cannot be analysed as they are; the message says what and where."""


@dataclass(frozen=True)
class Exclusion:
    """Rows left out of the analysis for one reason (all of them are in the quarantine table)."""

    table: str
    reason: str
    rows: int
    users: int
    examples: tuple[str, ...]


@dataclass(frozen=True)
class SliceKey:
    """A group of users: `kind` (all, query_segment, user_type, day), its value, and the variant."""

    kind: str
    value: str
    variant: str


@dataclass(frozen=True)
class Prepared:
    """What the statistics see: sufficient statistics per slice and variant, plus bookkeeping."""

    stats: Mapping[SliceKey, SuffStats]
    active_users: Mapping[SliceKey, int]
    variants: tuple[str, ...]
    exclusions: tuple[Exclusion, ...]
    reconciliation: Mapping[str, int]
    caps: Mapping[str, float]  # winsorisation caps by per-user value, filter and period
    experiment_id: str
    first_day: dt.date | None
    last_day: dt.date | None
    quarantine: pa.Table


# --- reading --------------------------------------------------------------------------------------


def _typed_select(table: Table, source: str) -> str:
    duck = {"string": "VARCHAR", "int32": "INTEGER", "int64": "BIGINT", "float64": "DOUBLE",
            "bool": "BOOLEAN", "date": "DATE", "timestamp": "TIMESTAMPTZ"}
    cols = ", ".join(f"CAST({c.name} AS {duck[c.type]}) AS {c.name}" for c in table.columns)
    return f"SELECT {cols} FROM {source}"


def _parquet_scan(table: Table, path: Path) -> str:
    """A DuckDB `read_parquet(...)` of the table's files under `path` (a data root, the table's
    folder or one parquet file); `ds` partitions come from the folder names as DATE."""
    if path.is_dir():
        folder = storage.table_path(path, table) if (path / table.name).is_dir() else path
        if folder.name != table.name:
            raise InputError(f"{path}: expected a data root containing {table.name}/ or the {table.name}/ folder itself")
        partitioned = any(folder.glob("ds=*"))
        pattern = folder / ("ds=*/*.parquet" if partitioned else "*.parquet")
        if not any(folder.glob(str(pattern.relative_to(folder)))):
            raise InputError(f"{folder}: no parquet files ({pattern})")
        hive = ", hive_partitioning = true, hive_types = {'ds': DATE}" if partitioned else ", hive_partitioning = false"
        return f"read_parquet({literal(str(pattern))}{hive})"
    if path.suffix != ".parquet":
        raise InputError(f"{path}: expected a parquet file, a folder or a DuckDB database ({', '.join(DUCKDB_SUFFIXES)})")
    return f"read_parquet({literal(str(path))}, hive_partitioning = false)"


def register_source(con: duckdb.DuckDBPyConnection, table: Table, source: Source, view: str) -> None:
    """Make `view` a DuckDB view of `source` with exactly `table`'s columns, cast to its types.

    A path reaches SQL only as a bound parameter (ATTACH) or a quoted literal (the view's
    `read_parquet`), so a file name is never read as SQL; a file DuckDB cannot read is an `InputError`
    naming it."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise InputError(f"{table.name}: {path} does not exist")
        if path.is_file() and path.suffix in DUCKDB_SUFFIXES:
            alias = f"src_{view}"
            try:
                con.execute(f"ATTACH ? AS {alias} (READ_ONLY)", [str(path)])
            except duckdb.Error as error:
                raise InputError(f"{path}: not a readable DuckDB database ({error})") from None
            found = con.execute(
                "SELECT count(*) FROM duckdb_tables() WHERE database_name = ? AND table_name = ?", [alias, table.name]
            ).fetchall()[0][0]
            if not found:
                raise InputError(f"{path}: the DuckDB database has no table {table.name!r}")
            scan = f"{alias}.{table.name}"
        else:
            scan = _parquet_scan(table, path)
        try:
            have = [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()]
        except duckdb.Error as error:
            raise InputError(f"{path}: cannot read {table.name} ({error})") from None
        missing = [c for c in table.names if c not in have]
        if missing:
            raise InputError(f"{path}: {table.name} needs columns {missing}; the data has {have}")
        con.execute(f"CREATE TEMP VIEW {view} AS {_typed_select(table, scan)}")
        return
    if isinstance(source, duckdb.DuckDBPyRelation):
        data = source.to_arrow_table()
    elif isinstance(source, pa.Table):
        data = source
    elif hasattr(source, "to_parquet") and hasattr(source, "columns"):  # a pandas DataFrame
        data = pa.Table.from_pandas(source, preserve_index=False)
    else:
        raise InputError(f"{table.name}: cannot read a {type(source).__name__}; pass a path, an Arrow or pandas table or a DuckDB relation")
    if isinstance(data, pa.Table):
        missing = [c for c in table.names if c not in data.column_names]
        if missing:
            raise InputError(f"{table.name}: missing columns {missing} (have {data.column_names})")
        data = data.select(table.names)
    con.register(f"{view}_arrow", data)
    con.execute(f"CREATE TEMP VIEW {view} AS {_typed_select(table, f'{view}_arrow')}")


# --- checks ---------------------------------------------------------------------------------------


def _rule_checks(table: Table) -> list[tuple[str, str, str]]:
    """(field, reason, SQL condition that flags a bad row) for each row rule of the table."""
    checks = []
    for c in table.columns:
        if not c.nullable:
            checks.append((c.name, f"{c.name} is null", f"{c.name} IS NULL"))
        if c.allowed is not None:
            values = ", ".join(literal(str(v)) for v in c.allowed)
            checks.append((c.name, f"{c.name} not one of {list(c.allowed)}", f"{c.name} NOT IN ({values})"))
        if c.min_value is not None:
            checks.append((c.name, f"{c.name} below {c.min_value:g}", f"{c.name} < {c.min_value!r}"))
        if c.type == "float64":
            checks.append((c.name, f"{c.name} is NaN or infinite", f"NOT isfinite({c.name})"))
    return checks


def _case(checks: Sequence[tuple[str, str, str]], pick: int) -> str:
    """SQL giving the field (pick 0) or reason (pick 1) of the first rule a row breaks, else NULL."""
    whens = " ".join(f"WHEN {check[2]} THEN {literal(check[pick])}" for check in checks)
    return f"CASE {whens} END" if checks else "NULL"


def _record(table: Table, alias: str = "") -> str:
    prefix = f"{alias}." if alias else ""
    return "to_json(struct_pack(" + ", ".join(f"{c} := {prefix}{c}" for c in table.names) + "))"


# --- the pipeline ---------------------------------------------------------------------------------


def _atoms(metrics: Sequence[Metric]) -> dict[tuple[str, str, str], str]:
    """(value SQL name, filter SQL, period) -> per-user column name, for every value any metric uses."""
    atoms: dict[tuple[str, str, str], str] = {}

    def add(value: UserValue | None, filter_sql: str, period: str) -> None:
        if value is not None:
            atoms.setdefault((str(value), filter_sql, period), f"v{len(atoms)}")

    for m in metrics:
        add(m.numerator, m.filter_sql(), "exp")
        add(m.denominator, m.filter_sql(), "exp")
        if m.covariate_parts is not None:
            add(m.covariate_parts[0], m.filter_sql(), "pre")
            add(m.covariate_parts[1], m.filter_sql(), "pre")
    return atoms


def _atom_of(atoms: Mapping[tuple[str, str, str], str], value: UserValue | None, m: Metric, period: str) -> str | None:
    return None if value is None else atoms[(str(value), m.filter_sql(), period)]


def _metric_parts(atoms: Mapping[tuple[str, str, str], str], m: Metric) -> dict[str, str | None]:
    cov = m.covariate_parts or (None, None)
    return {
        NUM: _atom_of(atoms, m.numerator, m, "exp"),
        DEN: _atom_of(atoms, m.denominator, m, "exp"),
        COV_NUM: _atom_of(atoms, cov[0], m, "pre"),
        COV_DEN: _atom_of(atoms, cov[1], m, "pre"),
    }


def _capped(num: str | None, den: str | None, caps: Mapping[str, float]) -> tuple[str | None, str | None]:
    """SQL for one (numerator, denominator) pair capped the same way (see module docstring)."""
    if num is None:
        return None, None
    if den is None:
        return (f"least({num}, {caps[num]!r})" if num in caps else num), None
    factors = [f"{caps[c]!r} / nullif({c}, 0)" for c in (num, den) if c in caps]
    if not factors:
        return num, den
    factor = f"coalesce(least(1.0, {', '.join(factors)}), 1.0)"
    return f"{num} * {factor}", f"{den} * {factor}"


def prepare(
    events: Source,
    assignment: Source,
    metrics: Sequence[Metric],
    experiment_start: dt.date,
    experiment_id: str | None = None,
    winsorize: float | None = None,
    threads: int | None = None,
) -> Prepared:
    """Read, check and aggregate the inputs into `Prepared` (see the module docstring)."""
    con = duckdb.connect()
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    register_source(con, EXPERIMENT_ASSIGNMENT, assignment, "assignment_src")
    register_source(con, EXPERIMENT_EVENTS, events, "events_src")
    start = f"DATE {literal(experiment_start.isoformat())}"

    experiment_id = _pick_experiment(con, experiment_id)
    _check_assignment(con, experiment_id)
    _check_events(con, start)
    variants = tuple(r[0] for r in con.execute("SELECT DISTINCT variant FROM assign ORDER BY variant").fetchall())
    if not variants:
        raise InputError(f"experiment {experiment_id!r}: no users left in the assignment after the checks")

    atoms = _atoms(metrics)
    aggs = [f"{UserValue.parse(name).sql(('is_exp' if period == 'exp' else 'NOT is_exp') + ('' if fsql == 'TRUE' else ' AND ' + fsql))} AS {col}"
            for (name, fsql, period), col in atoms.items()]
    aggs.append(f"sum(CAST(is_exp AS INTEGER)) AS {ACTIVE}")
    atom_cols = [*atoms.values(), ACTIVE]
    used = "reason IS NULL AND uid IS NOT NULL"
    cast = ", ".join(f"CAST(coalesce(p.{c}, 0) AS DOUBLE) AS {c}" for c in atom_cols)
    exp_cols = [col for (_, _, period), col in atoms.items() if period == "exp"]
    exp_cast = ", ".join([f"CAST(p.{c} AS DOUBLE) AS {c}" for c in exp_cols]
                         + [f"0.0 AS {c}" for (_, _, period), c in atoms.items() if period == "pre"])
    exp_aggs = [a for a, (_, _, period) in zip(aggs, atoms) if period == "exp"] + [aggs[-1]]
    segments = EXPERIMENT_EVENTS.column("query_segment").allowed
    # Slices group on one integer key: uid * 4 + segment code, and uid * 2^16 + day. The overall
    # per-user values are rolled up from the per-segment ones (max for any_positive, else sum).
    con.execute(f"""
        CREATE TEMP TABLE per_user_segment AS
        SELECT uid * 4 + enum_code(query_segment) + 1 AS key, {', '.join(aggs)} FROM ev WHERE {used} GROUP BY key
    """)
    rollup = [f"{'max' if name.startswith('any_positive') else 'sum'}({col}) AS {col}"
              for (name, _, _), col in atoms.items()] + [f"sum({ACTIVE}) AS {ACTIVE}"]
    con.execute(f"""
        CREATE TEMP TABLE users_all AS
        SELECT a.variant, a.user_type, {cast}
        FROM assign a LEFT JOIN (SELECT key // 4 AS uid, {', '.join(rollup)} FROM per_user_segment GROUP BY 1) p USING (uid)
    """)
    con.execute(f"""
        CREATE TEMP VIEW users_segment AS
        SELECT [{', '.join(literal(s) for s in segments)}][p.key % 4] AS value, a.variant, {cast}
        FROM per_user_segment p JOIN assign a ON a.uid = p.key // 4
    """)
    con.execute(f"""
        CREATE TEMP TABLE per_user_day AS
        SELECT uid * 65536 + day AS key, {', '.join(exp_aggs)} FROM ev WHERE {used} AND is_exp AND day >= 0 GROUP BY key
    """)
    con.execute(f"""
        CREATE TEMP VIEW users_day AS
        SELECT CAST(p.key % 65536 AS VARCHAR) AS value, a.variant, {exp_cast}, CAST(p.{ACTIVE} AS DOUBLE) AS {ACTIVE}
        FROM per_user_day p JOIN assign a ON a.uid = p.key // 65536
    """)

    caps: dict[str, float] = {}
    if winsorize is not None:
        quantiles = ", ".join(f"quantile_cont({c}, {winsorize!r})" for c in atoms.values())
        row = con.execute(f"SELECT {quantiles} FROM users_all").fetchall()[0]
        caps = {c: float(q) for c, q in zip(atoms.values(), row) if q is not None and q > 0}

    parts: dict[str, str] = {}
    for m in metrics:
        p = _metric_parts(atoms, m)
        num, den = _capped(p[NUM], p[DEN], caps)
        cnum, cden = _capped(p[COV_NUM], p[COV_DEN], caps)
        for part, expr in ((NUM, num), (DEN, den), (COV_NUM, cnum), (COV_DEN, cden)):
            if expr is not None:
                parts[column(m.name, part)] = expr
    exp_parts = {c: e for c, e in parts.items() if c.endswith(f"__{NUM}") or c.endswith(f"__{DEN}")}

    last_day, first_day = con.execute(
        "SELECT max(ds), min(ds) FROM ev WHERE reason IS NULL AND uid IS NOT NULL AND is_exp").fetchall()[0]
    users = _user_counts(con, last_day)
    stats: dict[SliceKey, SuffStats] = {}
    active: dict[SliceKey, int] = {}
    queries = (
        ("users_all", literal(ALL), "variant", parts),
        ("users_all", "user_type", "variant, user_type", parts),
        ("users_segment", "value", "variant, value", parts),
        ("users_day", "value", "variant, value", exp_parts),
    )
    kinds = (ALL, USER_TYPE, QUERY_SEGMENT, DAY)
    for kind, (source, value, group, kind_parts) in zip(kinds, queries):
        for key, n_rows, n_active, sums in _moments(con, source, value, group, kind_parts, kind):
            n = users.get(key, 0)
            if kind in (ALL, USER_TYPE) and n != n_rows:
                raise AssertionError(f"{key}: {n_rows} per-user rows for {n} assigned users")
            stats[key] = SuffStats(n=n, sums=sums[0], cross=sums[1])
            active[key] = n_active

    exclusions, quarantine = _exclusions(con)
    reconciliation = _reconcile(con, exclusions)
    con.close()
    return Prepared(
        stats=stats, active_users=active, variants=variants, exclusions=exclusions,
        reconciliation=reconciliation, caps=_readable_caps(atoms, caps), experiment_id=experiment_id,
        first_day=first_day, last_day=last_day, quarantine=quarantine,
    )


def _moments(con: duckdb.DuckDBPyConnection, source: str, value: str, group: str, parts: Mapping[str, str], kind: str):
    """Per group: (SliceKey, rows, active users, (sums, cross-products)) of each metric's parts.

    Cross-products are only taken within a metric (all any statistic needs)."""
    names = sorted(parts)
    pairs = [(a, b) for a in names for b in names if a <= b and a.split("__")[0] == b.split("__")[0]]
    projected = ", ".join(f"{expr} AS {identifier(c)}" for c, expr in parts.items())
    select = [f"sum({identifier(c)})" for c in names] + [f"sum({identifier(a)} * {identifier(b)})" for a, b in pairs]
    rows = con.execute(f"""
        SELECT {value} AS value, variant, count(*), count(*) FILTER (WHERE {ACTIVE} > 0), {', '.join(select)}
        FROM (SELECT *, {projected} FROM {source}) GROUP BY {value}, variant
    """).fetchall()
    out = []
    for row in rows:
        values = [float(x) for x in row[4:]]
        sums = dict(zip(names, values[: len(names)]))
        cross = dict(zip(pairs, values[len(names):]))
        out.append((SliceKey(kind, str(row[0]), row[1]), int(row[2]), int(row[3]), (sums, cross)))
    return out


def _readable_caps(atoms: Mapping[tuple[str, str, str], str], caps: Mapping[str, float]) -> dict[str, float]:
    """Caps keyed 'value [filter] (period)', e.g. 'sum(gmv) [TRUE] (exp)'."""
    return {f"{name} [{fsql}] ({period})": caps[col] for (name, fsql, period), col in atoms.items() if col in caps}


def _pick_experiment(con: duckdb.DuckDBPyConnection, experiment_id: str | None) -> str:
    found = [r[0] for r in con.execute(
        "SELECT DISTINCT experiment_id FROM assignment_src WHERE experiment_id IS NOT NULL ORDER BY 1").fetchall()]
    if experiment_id is None:
        if len(found) != 1:
            raise InputError(f"experiment_assignment holds experiments {found}; choose one with experiment_id")
        return found[0]
    if experiment_id not in found:
        raise InputError(f"experiment {experiment_id!r} is not in experiment_assignment (it holds {found})")
    return experiment_id


def _check_assignment(con: duckdb.DuckDBPyConnection, experiment_id: str) -> None:
    """`assign` (one row per usable user, with an integer `uid`) and `assign_bad` (rejected rows)."""
    checks = _rule_checks(EXPERIMENT_ASSIGNMENT)
    con.execute(f"""
        CREATE TEMP TABLE assign_checked AS
        SELECT *, {_case(checks, 0)} AS bad_field, {_case(checks, 1)} AS bad_reason
        FROM assignment_src WHERE experiment_id = ? OR experiment_id IS NULL
    """, [experiment_id])
    con.execute("""
        CREATE TEMP TABLE assign_users AS
        SELECT user_id, row_number() OVER () AS uid, min(variant) <> max(variant) AS conflicted, count(*) AS n_rows,
               arg_min(variant, first_exposure_ts) AS variant, min(first_exposure_ts) AS first_exposure_ts,
               CAST(min(first_exposure_ts) AS DATE) AS exposure_date, arg_min(user_type, first_exposure_ts) AS user_type
        FROM assign_checked WHERE bad_reason IS NULL GROUP BY user_id
    """)
    con.execute("CREATE TEMP VIEW assign AS SELECT * FROM assign_users WHERE NOT conflicted")
    record = _record(EXPERIMENT_ASSIGNMENT, "c")
    con.execute(f"""
        CREATE TEMP TABLE assign_bad AS
        SELECT 'experiment_assignment' AS source_table, bad_field AS field, bad_reason AS reason, user_id,
               user_id AS example, {record} AS record FROM assign_checked c WHERE bad_reason IS NOT NULL
        UNION ALL
        SELECT 'experiment_assignment', 'variant', 'user assigned to more than one variant', user_id, user_id, {record}
        FROM assign_checked c JOIN assign_users u USING (user_id) WHERE c.bad_reason IS NULL AND u.conflicted
        UNION ALL
        SELECT 'experiment_assignment', 'user_id', 'repeated assignment row', user_id, user_id, {record}
        FROM (SELECT c.*, row_number() OVER (PARTITION BY user_id ORDER BY c.first_exposure_ts) AS rank
              FROM assign_checked c JOIN assign_users u USING (user_id)
              WHERE c.bad_reason IS NULL AND NOT u.conflicted AND u.n_rows > 1) c
        WHERE rank > 1
    """)


def _check_events(con: duckdb.DuckDBPyConnection, start: str) -> None:
    """`ev`: every event row, slim, with the user's integer `uid`, `query_segment`,
    `is_exp`, `day` since exposure and the `reason` it is rejected (NULL when usable);
    `events_classified` has the full rows with `field` and `reason`, for the quarantine.
    `query_segment` is an ENUM, so metric filters on it stay cheap; a value outside it is NULL there
    and its row is rejected by the allowed-values rule (quarantined, counted), never a failed cast.

    The first build checks the assignment-related reasons per row and only counts rows breaking a
    row rule and repeated request ids (by hash); when there are any, `ev` is rebuilt with every
    check compiled in (the rare, slower path), so clean data is scanned once.
    """
    checks = _rule_checks(EXPERIMENT_EVENTS)
    joined = [
        ("user_id", "user assigned to more than one variant", "a.conflicted"),
        ("user_id", "event of a user without assignment", f"e.ds >= {start} AND a.user_id IS NULL"),
        ("ts", "event before the user's first exposure", f"e.ds >= {start} AND e.ts < a.first_exposure_ts"),
    ]
    extra = f"({' OR '.join(c[2] for c in checks)}) AS broken, hash(request_id) AS request_hash"
    _build_ev(con, start, joined, extra)
    broken, repeated = con.execute(
        "SELECT count(*) FILTER (WHERE broken), count(*) - count(DISTINCT request_hash) FROM ev").fetchall()[0]
    if broken or repeated:
        rules = list(checks)
        if repeated:
            rules.append(("request_id", "repeated request_id",
                          "row_number() OVER (PARTITION BY request_id ORDER BY ts, user_id) > 1"))
        con.execute("DROP VIEW events_classified; DROP TABLE ev")
        _build_ev(con, start, rules + joined, "")


def _build_ev(con: duckdb.DuckDBPyConnection, start: str, rules: list[tuple[str, str, str]], extra: str) -> None:
    segments = EXPERIMENT_EVENTS.column("query_segment").allowed
    con.execute(f"""
        CREATE TEMP VIEW events_classified AS
        SELECT e.*, CASE WHEN a.conflicted THEN NULL ELSE a.uid END AS uid, a.exposure_date,
               {_case(rules, 0)} AS field, {_case(rules, 1)} AS reason
        FROM events_src e LEFT JOIN assign_users a USING (user_id)
    """)
    con.execute(f"""
        CREATE TEMP TABLE ev AS
        SELECT uid, TRY_CAST(query_segment AS ENUM ({', '.join(literal(v) for v in segments)})) AS query_segment,
               impressions, clicks, add_to_carts, orders, gmv, ds, ds >= {start} AS is_exp,
               date_diff('day', exposure_date, ds) AS day, reason{', ' + extra if extra else ''}
        FROM events_classified
    """)


def _exclusions(con: duckdb.DuckDBPyConnection) -> tuple[tuple[Exclusion, ...], pa.Table]:
    """Per-reason counts of rejected rows and the quarantine table of those rows."""
    parts = ["SELECT * FROM assign_bad"]
    if con.execute("SELECT count(*) FROM ev WHERE reason IS NOT NULL").fetchall()[0][0]:
        parts.append(f"""
            SELECT 'experiment_events', field, reason, user_id, request_id, {_record(EXPERIMENT_EVENTS)}
            FROM events_classified WHERE reason IS NOT NULL""")
    con.execute("CREATE TEMP TABLE quarantined AS " + " UNION ALL ".join(f"({p})" for p in parts))
    rows = con.execute("""
        SELECT source_table, reason, count(*), count(DISTINCT user_id), list(example ORDER BY example)[1:5]
        FROM quarantined GROUP BY ALL ORDER BY 1, 2
    """).fetchall()
    exclusions = tuple(Exclusion(t, r, int(n), int(u), tuple(str(x) for x in ex)) for t, r, n, u, ex in rows)
    quarantine = con.sql("""
        SELECT source_table, CAST(NULL AS VARCHAR) AS source_file, CAST(NULL AS BIGINT) AS row_number, field,
               reason, CAST(record AS VARCHAR) AS record, now() AS quarantined_at
        FROM quarantined
    """).to_arrow_table()
    return exclusions, QUARANTINE.conform(quarantine)


def _reconcile(con: duckdb.DuckDBPyConnection, exclusions: Sequence[Exclusion]) -> dict[str, int]:
    """Event and assignment row counts that add up: in = used + quarantined (+ unused pre-period rows)."""
    ev = con.execute("""
        SELECT count(*),
               count(*) FILTER (WHERE reason IS NULL AND uid IS NOT NULL AND is_exp),
               count(*) FILTER (WHERE reason IS NULL AND uid IS NOT NULL AND NOT is_exp),
               count(*) FILTER (WHERE reason IS NULL AND uid IS NULL),
               count(*) FILTER (WHERE reason IS NOT NULL)
        FROM ev
    """).fetchall()[0]
    asg = con.execute("SELECT (SELECT count(*) FROM assign_checked), (SELECT count(*) FROM assign)").fetchall()[0]
    counts = {
        "events_in": ev[0], "events_experiment_used": ev[1], "events_pre_period_used": ev[2],
        "events_pre_period_outside_experiment": ev[3], "events_quarantined": ev[4],
        "assignment_rows_in": asg[0], "assignment_users_used": asg[1],
        "assignment_rows_quarantined": sum(e.rows for e in exclusions if e.table == "experiment_assignment"),
    }
    if counts["events_in"] != ev[1] + ev[2] + ev[3] + ev[4]:
        raise AssertionError(f"event counts do not reconcile: {counts}")
    if counts["assignment_rows_in"] != counts["assignment_users_used"] + counts["assignment_rows_quarantined"]:
        raise AssertionError(f"assignment counts do not reconcile: {counts}")
    return {k: int(v) for k, v in counts.items()}


def _user_counts(con: duckdb.DuckDBPyConnection, last_day: dt.date | None) -> dict[SliceKey, int]:
    """Users per slice: all assigned users for the overall and query-segment slices; for day d, the
    users exposed at least d days before the last day of data (so that day d was observable)."""
    counts: dict[SliceKey, int] = {}
    for variant, user_type, n in con.execute("SELECT variant, user_type, count(*) FROM assign GROUP BY ALL").fetchall():
        counts[SliceKey(USER_TYPE, user_type, variant)] = n
        counts[SliceKey(ALL, ALL, variant)] = counts.get(SliceKey(ALL, ALL, variant), 0) + n
    for key in [k for k in counts if k.kind == ALL]:
        for segment in EXPERIMENT_EVENTS.column("query_segment").allowed:
            counts[SliceKey(QUERY_SEGMENT, segment, key.variant)] = counts[key]
    if last_day is not None:
        by_day = con.execute("SELECT variant, exposure_date, count(*) FROM assign GROUP BY ALL").fetchall()
        for variant, exposure_date, n in by_day:
            for d in range((last_day - exposure_date).days + 1):
                key = SliceKey(DAY, str(d), variant)
                counts[key] = counts.get(key, 0) + n
    return counts
