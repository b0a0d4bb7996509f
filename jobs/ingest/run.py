"""`relevance ingest`: read a public relevance dataset (WANDS or ESCI) into our tables.

Reads the dataset folder with the reader registered for `format`, writes every table it produced
(CATALOG, QUERIES, JUDGMENTS, GOLD_NODES; a table whose source file was not read is not written,
so an existing one is left alone) and the QUARANTINE table under `out` with
`schemas.storage.write_table`, and prints per table how many rows came in, were accepted,
quarantined or filtered out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jobs.ingest import esci, wands
from jobs.ingest.common import IngestResult
from schemas.config import ConfigError, help_field
from schemas.storage import write_table
from schemas.tables import QUARANTINE, table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestConfig:
    format: Literal["wands", "esci"] = help_field("Dataset format: wands or esci.")
    source: Path = help_field(
        "The dataset folder (WANDS: query.csv, product.csv, label.csv; ESCI: the two shopping_queries parquet files)."
    )
    out: Path = help_field("Data root the tables are written under (<out>/<table>/part-00000.parquet).")
    files: tuple[str, ...] = help_field(
        "Which files to read (WANDS: query, product, label; ESCI: examples, products); empty: every one present.",
        (),
    )
    locale: str | None = help_field("ESCI only: keep only this product_locale (us, es or jp); empty: all.", None)
    strict: bool = help_field(
        "Stop at the first bad row (naming file, row and field) instead of quarantining it.", False
    )

    def __post_init__(self) -> None:
        if self.format not in READERS:
            raise ConfigError(f"format {self.format!r} is unknown; use one of {sorted(READERS)}")
        if not Path(self.source).is_dir():
            raise ConfigError(f"source {self.source} is not a folder; point it at the dataset folder")
        known_files = wands.FILES if self.format == "wands" else esci.FILES
        unknown = [name for name in self.files if name not in known_files]
        if unknown:
            raise ConfigError(f"files {unknown} are not {self.format} files; use some of {sorted(known_files)}")
        if self.locale is not None:
            if self.format != "esci":
                raise ConfigError("locale applies to format=esci only; leave it empty for wands")
            if self.locale not in esci.LOCALES:
                raise ConfigError(f"locale {self.locale!r} is not an ESCI locale; use one of {list(esci.LOCALES)}")


READERS: dict[str, Callable[[IngestConfig], IngestResult]] = {
    "wands": lambda config: wands.read_wands(config.source, config.files or None, strict=config.strict),
    "esci": lambda config: esci.read_esci(
        config.source, config.files or None, locale=config.locale, strict=config.strict
    ),
}


def format_counts(result: IngestResult) -> str:
    """A plain-text summary: one line per table read from a file, one per derived table, then stats."""
    lines = [f"{'table':<12} {'in':>10} {'accepted':>10} {'quarantined':>12} {'filtered':>10}  file"]
    for name, counts in result.counts.items():
        lines.append(
            f"{name:<12} {counts.read:>10} {counts.accepted:>10} {counts.quarantined:>12} "
            f"{counts.filtered:>10}  {counts.source_file}"
        )
    for name, data in result.tables().items():
        if name not in result.counts:
            lines.append(f"{name:<12} {'':>10} {data.num_rows:>10} {'':>12} {'':>10}  (derived)")
    lines.append(f"{'quarantine':<12} {'':>10} {result.quarantine.num_rows:>10} rows")
    lines.extend(f"  {key}: {value}" for key, value in result.stats.items())
    return "\n".join(lines)


def run(config: IngestConfig) -> IngestResult:
    result = READERS[config.format](config)
    broken = [counts for counts in result.counts.values() if not counts.reconciles]
    if broken:
        raise RuntimeError(f"ingest counts do not reconcile (a reader bug): {broken}")
    for name, data in result.tables().items():
        write_table(table(name), data, config.out)
    write_table(QUARANTINE, result.quarantine, config.out)
    log.info(format_counts(result))
    return result
