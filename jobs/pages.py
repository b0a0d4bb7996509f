"""Self-contained HTML pages for the jobs' reports: the stylesheet inline, every link relative, every
cell escaped, and a great-expectations suite result as a table (our own rendering of what GE's Data
Docs show: each expectation, what it expected, whether it was met, the observed value, the unexpected
rows and a few of them).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import quote

from schemas.expectations import ExpectationOutcome, SuiteResult

STYLE_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1.2em}th,td{border:1px solid #ccc;padding:3px 8px;vertical-align:top;"
    "font-variant-numeric:tabular-nums}th{background:#f3f3f3;text-align:left}strong{color:#b00}"
    "td{overflow-wrap:anywhere}.meta{color:#555}code{font-size:0.9em}td a{margin-right:0.8em}img{max-width:100%}"
)
MISSING = "–"
# A list longer than this (a table's column list) is folded into a <details> element, so it does not
# stretch every row of a suite's table.
FOLDED_ITEMS = 8


class Html(str):
    """Markup already escaped: `table` puts it into a cell as it is."""


def shown(value: Any) -> str:
    """A value as a cell reads it: None and non-finite numbers as a dash (never 'nan'), floats to 4 significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=str)
    return str(value)


def link(href: str, text: str) -> Html:
    """A link to `href`, a relative path (URL-quoted here)."""
    return Html(f"<a href='{html.escape(quote(href))}'>{html.escape(text)}</a>")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Html:
    """A table; a cell is `Html` (as it is) or any value (`shown`, escaped)."""

    def cell(value: Any) -> str:
        if isinstance(value, Html):
            return f"<td>{value}</td>"
        return f"<td>{html.escape(shown(value))}</td>"

    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(cell(value) for value in row) + "</tr>" for row in rows)
    return Html(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def page(title: str, body: Iterable[str]) -> str:
    """A whole page: `body` is markup (escape text with `html.escape` or build it with `table` and `link`)."""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE_CSS}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def _markup(value: Any) -> Html:
    """`value` shown and escaped; a long list folded into a <details> element."""
    text = html.escape(shown(value))
    if isinstance(value, list | tuple) and len(value) > FOLDED_ITEMS:
        return Html(f"<details><summary>{len(value)} items</summary>{text}</details>")
    return Html(text)


def _unexpected(outcome: ExpectationOutcome) -> str:
    if outcome.unexpected_count is None:
        return MISSING
    if not outcome.element_count:
        return str(outcome.unexpected_count)
    return f"{outcome.unexpected_count} of {outcome.element_count} ({outcome.unexpected_count / outcome.element_count:.2%})"


def suite_table(suite: SuiteResult, explain: Callable[[ExpectationOutcome], str] | None = None) -> Html:
    """One row per expectation of `suite`. `explain(outcome)`: a sentence on what it checks, for a
    job's own expectations on derived columns (None: no such column)."""
    header = ["expectation", "column", "expected", *(["what it checks"] if explain else []), "result", "observed", "unexpected rows",
              "examples"]
    rows = []
    for outcome in suite.outcomes:
        verdict = "met" if outcome.success else Html("<strong>FAILED</strong>")
        expected = Html(", ".join(f"{html.escape(key)}={_markup(value)}" for key, value in outcome.arguments.items())) or MISSING
        examples = "; ".join(shown(example) for example in outcome.examples) or MISSING
        rows.append([Html(f"<code>{html.escape(outcome.expectation)}</code>"), outcome.column, expected,
                     *([explain(outcome)] if explain else []), verdict, _markup(outcome.observed_value), _unexpected(outcome), examples])
    return table(header, rows)


def suite_heading(suite: SuiteResult) -> Html:
    met = sum(outcome.success for outcome in suite.outcomes)
    return Html(f"<h2>{html.escape(suite.table)}: {met} of {len(suite.outcomes)} expectations met ({html.escape(suite.engine)})</h2>")
