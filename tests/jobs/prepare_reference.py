"""An independent DuckDB SQL implementation of `relevance prepare`'s aggregates (tests and the benchmark).

It reads the same parquet files and applies the same documented rules (row rules, first row of a
duplicate key in file order, unknown products, funnel, ts after the day), normalisation (NFKC via
Python's unicodedata, then lower / whitespace / synonyms in SQL), the same examination-rate estimator
and content hash, written from the definitions in jobs/prepare.py's docstring, not from its code.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from pathlib import Path

import duckdb
import pyarrow as pa


def duckdb_prepare(data: str | Path, day: dt.date, synonyms: dict[str, str], threads: int = 2) -> dict[str, pa.Table]:
    """{'query_product_stats': ..., 'candidate_pairs': ..., 'rates': ...} as Arrow tables."""
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.create_function("nfkc", lambda s: unicodedata.normalize("NFKC", s), ["VARCHAR"], "VARCHAR")
    con.execute("CREATE TABLE synonyms (token VARCHAR, replacement VARCHAR)")
    if synonyms:
        con.executemany("INSERT INTO synonyms VALUES (?, ?)", list(synonyms.items()))
    impressions = f"{Path(data)}/search_impressions/ds={day.isoformat()}/*.parquet"
    catalog = f"{Path(data)}/catalog/*.parquet"
    con.execute(f"""
        CREATE TABLE products AS
        SELECT product_id,
               sha256(concat_ws(chr(31), coalesce(title, ''), coalesce(description, ''), coalesce(product_type, ''),
                      coalesce(brand, ''),
                      coalesce(array_to_string(list_transform(list_sort(map_entries(attributes)),
                               lambda e: e.key || '=' || coalesce(e.value, '')), ';'), ''))) AS product_content_hash
        FROM read_parquet('{catalog}', filename = true, file_row_number = true)
        WHERE product_id IS NOT NULL AND title IS NOT NULL AND product_type IS NOT NULL AND attributes IS NOT NULL
          AND (price IS NULL OR price >= 0) AND source IN ('synthetic', 'wands', 'esci', 'own')
        QUALIFY row_number() OVER (PARTITION BY product_id ORDER BY filename, file_row_number) = 1
    """)
    con.execute(f"""
        CREATE TABLE valid AS
        SELECT * FROM read_parquet('{impressions}', filename = true, file_row_number = true)
        WHERE request_id IS NOT NULL AND user_id IS NOT NULL AND query_id IS NOT NULL AND query IS NOT NULL
          AND product_id IS NOT NULL AND position >= 1 AND clicked IS NOT NULL AND added_to_cart IS NOT NULL
          AND ordered IS NOT NULL AND quantity >= 0 AND price >= 0 AND ts IS NOT NULL
        QUALIFY row_number() OVER (PARTITION BY request_id, position ORDER BY filename, file_row_number) = 1
    """)
    con.execute(f"""
        CREATE TABLE kept AS
        SELECT v.* FROM valid v
        WHERE v.product_id IN (SELECT product_id FROM products)
          AND NOT (v.added_to_cart AND NOT v.clicked) AND NOT (v.ordered AND NOT v.added_to_cart)
          AND (v.ordered = (v.quantity > 0)) AND CAST(v.ts AS DATE) <= DATE '{day.isoformat()}'
    """)
    con.execute("""
        CREATE TABLE normalised AS
        WITH raw AS (SELECT DISTINCT query AS raw_query FROM kept),
        tokens AS (
            SELECT raw_query, unnest(generate_series(1, len(parts))) AS i, unnest(parts) AS token
            FROM (SELECT raw_query,
                         string_split(trim(regexp_replace(lower(nfkc(raw_query)), '\\s+', ' ', 'g')), ' ') AS parts
                  FROM raw)
        )
        SELECT t.raw_query, string_agg(coalesce(s.replacement, t.token), ' ' ORDER BY t.i) AS query
        FROM tokens t LEFT JOIN synonyms s ON s.token = t.token
        GROUP BY t.raw_query
    """)
    con.execute("""
        CREATE TABLE imps AS
        SELECT n.query, k.query_id, k.product_id, k.position, k.clicked, k.added_to_cart, k.ordered, k.quantity, k.price
        FROM kept k JOIN normalised n ON n.raw_query = k.query
    """)
    con.execute("""
        CREATE TABLE rates AS
        WITH cell AS (
            SELECT query, product_id, position, count(*) AS n, sum(clicked::INT) AS c FROM imps GROUP BY ALL
        ),
        ratio AS (
            SELECT here.position,
                   sum(here.n * up.n / (here.n + up.n) * here.c / here.n) AS num,
                   sum(here.n * up.n / (here.n + up.n) * up.c / up.n) AS den
            FROM cell here JOIN cell up
              ON up.query = here.query AND up.product_id = here.product_id AND up.position = here.position - 1
            GROUP BY here.position
        ),
        step AS (
            SELECT p.position,
                   CASE WHEN p.position > 1 AND r.num > 0 AND r.den > 0 THEN ln(r.num / r.den) ELSE 0 END AS log_r
            FROM (SELECT DISTINCT position FROM cell) p LEFT JOIN ratio r USING (position)
        )
        SELECT position, exp(sum(log_r) OVER (ORDER BY position ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW))
               AS examination_rate
        FROM step
    """)
    day_sql = f"DATE '{day.isoformat()}'"
    stats = con.sql(f"""
        SELECT i.query, i.product_id, count(*) AS impressions, sum(i.clicked::BIGINT) AS clicks,
               sum(i.added_to_cart::BIGINT) AS add_to_carts, sum(i.ordered::BIGINT) AS orders,
               sum(CASE WHEN i.ordered THEN i.price * i.quantity ELSE 0 END) AS gmv,
               sum(r.examination_rate) AS expected_examinations,
               CASE WHEN sum(r.examination_rate) > 0 THEN sum(i.clicked::BIGINT) / sum(r.examination_rate) END
                   AS debiased_ctr,
               any_value(p.product_content_hash) AS product_content_hash, {day_sql} AS ds
        FROM imps i JOIN rates r USING (position) JOIN products p USING (product_id)
        GROUP BY i.query, i.product_id
        ORDER BY i.query, i.product_id
    """).to_arrow_table()
    pairs = con.sql(f"""
        SELECT i.query, min(i.query_id) AS query_id, i.product_id, any_value(p.product_content_hash) AS product_content_hash,
               count(*) AS impressions, {day_sql} AS ds
        FROM imps i JOIN products p USING (product_id)
        GROUP BY i.query, i.product_id
        ORDER BY i.query, i.product_id
    """).to_arrow_table()
    rates = con.sql("SELECT * FROM rates ORDER BY position").to_arrow_table()
    con.close()
    return {"query_product_stats": stats, "candidate_pairs": pairs, "rates": rates}

