"""Reports of an `ExperimentResult`: Markdown, self-contained HTML (plots inlined as base64 PNG)
and JSON. The verdict comes first (ship / no ship / inconclusive per treatment variant, the rule in
`abtest.analysis`), with the harmed metrics called out before anything else; then the sample-ratio
check, since with an SRM alarm no other number is trustworthy. Every "n/a" cell of a metric table
carries a footnote saying why it has no number. A footer says which version of the tool made the
report, from which command line and when.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from abtest.aggregate import ALL  # noqa: E402
from abtest.analysis import CORRECTION_LABELS, ExperimentResult, MetricResult, format_p, sentence  # noqa: E402
from abtest.stats import SRM_ALARM_P  # noqa: E402
from schemas.provenance import Provenance  # noqa: E402

NA = "n/a"

METHOD_NOTES = (
    "Welch's t-test on per-user values (ratio metrics linearised with the delta method); p-values from the "
    "t survival function.",
    "CUPED: the pre-period value of each metric (events before the experiment start) is the covariate; "
    "theta is fitted on both variants pooled. 'Var. red.' is the share of the effect's variance it removed. "
    "A metric without pre-period data (e.g. an experiment starting on the first logged day) is estimated "
    "without CUPED, and its summary line says so.",
    "Relative lifts: CI on the log scale of treatment / control, both variants' variance included.",
    "Query good rate: requests with at least one click / requests, pooled over a user's requests "
    "(ratio of means, delta method). UCVR: share of users with an order.",
    "Fixed-horizon p-values are valid for one look at the planned end. 'Always-valid p' is the mSPRT "
    "(normal mixture) p-value, valid however often the experiment is looked at.",
    "Guardrails: one-sided non-inferiority test against the margin; segment and day-since-exposure rows "
    "are descriptive (not corrected for multiple comparisons, no CUPED in the day view).",
)


@dataclass(frozen=True)
class Table:
    """A table; `notes` are its footnotes, numbered [1], [2], ... in the cells that cite them."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Section:
    title: str
    lines: tuple[str, ...] = ()
    table: Table | None = None
    image: str | None = None  # a key of the images dict


def _num(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x * 100:+.2f}%"


def _na_reason(r: MetricResult, column: str) -> str:
    """Why the cell `column` of row `r` has no number (every way a metric table cell becomes n/a)."""
    if math.isnan(r.effect):
        return f"{r.metric}: {r.note}"
    if column in ("p adj.", "significant"):
        if r.slice_kind != ALL:
            return "segment rows are descriptive: they are not corrected for multiple comparisons"
        return ("a guardrail is judged by its one-sided non-inferiority test (guardrail column), corrected among "
                "the guardrails, not by the two-sided test")
    return f"{r.metric}: the control mean is 0, so a change relative to it is undefined"  # the lift and the MDE


def _metric_table(rows: Sequence[MetricResult], with_slice: bool = False) -> Table:
    header = ("metric", "tier", "variant", *(("slice",) if with_slice else ()), "control", "treatment",
              "lift [95% CI]", "p", "p adj.", "significant", "var. red.", "MDE", "always-valid p", "guardrail")
    notes: dict[str, int] = {}  # reason -> footnote number

    def cite(r: MetricResult, column: str, cell: str) -> str:
        if cell != NA:
            return cell
        number = notes.setdefault(_na_reason(r, column), len(notes) + 1)
        return f"{NA} [{number}]"

    out = []
    for r in rows:
        lift = f"{_pct(r.rel_effect)} [{_pct(r.rel_ci_low)}, {_pct(r.rel_ci_high)}]" if math.isfinite(r.rel_effect) else NA
        cells = (
            r.metric, r.tier, r.variant, *((f"{r.slice_kind}={r.slice_value}",) if with_slice else ()),
            _num(r.control), _num(r.treatment), lift, format_p(r.pvalue), format_p(r.pvalue_adjusted),
            NA if r.significant is None else ("yes" if r.significant else "no"),
            f"{r.variance_reduction:.0%}" if r.cuped and math.isfinite(r.variance_reduction) else "-",
            _pct(r.mde_relative).lstrip("+"), format_p(r.seq_pvalue),
            r.ni_verdict or (NA if r.tier == "guardrail" else ""),
        )
        out.append(tuple(cite(r, column, cell) for column, cell in zip(header, cells)))
    return Table(header, tuple(out), tuple(f"[{number}] {reason}" for reason, number in notes.items()))


def _verdict_lines(result: ExperimentResult) -> tuple[str, ...]:
    """The verdict of each treatment variant, the harmed metrics first, and the rule."""
    label = CORRECTION_LABELS.get(result.correction, result.correction)
    lines = []
    for decision in result.decisions():
        lines.append(f"**{decision.verdict.upper()}** for `{decision.variant}` against `{result.control}`: "
                     f"{'; '.join(decision.reasons)}.")
        harmed = [r for r in result.metrics if r.variant == decision.variant and r.metric in decision.harmed]
        if harmed:
            lines.append("Significant harms:")
            lines += [f"- **{sentence(r, result.correction)}**" for r in harmed]
    lines.append(
        f"Rule: no ship if a primary or secondary metric is significantly worse after {label} or a guardrail's "
        "interval lies wholly beyond its non-inferiority margin; ship if a primary metric is significantly better "
        "after the correction, nothing is harmed and every guardrail is shown within its margin; otherwise "
        "inconclusive. An SRM alarm makes the verdict inconclusive."
    )
    return tuple(lines)


def sections(result: ExperimentResult) -> list[Section]:
    """The report's content, rendered by `to_markdown` and `to_html`."""
    srm = result.srm
    counts = ", ".join(f"{v}: {n:,}" for v, n in srm.observed.items())
    verdict = (f"**SRM ALARM** (p = {format_p(srm.pvalue)} < {SRM_ALARM_P}): the split of users ({counts}) does not match "
               "the plan; fix the assignment or logging before reading any result below."
               if srm.alarm else f"Sample ratio OK (chi-square p = {format_p(srm.pvalue)}; users {counts}).")
    seg_rows = tuple((s.kind, s.value, ", ".join(f"{v}: {n:,}" for v, n in s.result.observed.items()),
                      format_p(s.result.pvalue), "ALARM" if s.result.alarm else "ok") for s in result.srm_segments)
    out = [
        Section("Verdict", _verdict_lines(result)),
        Section("Sample ratio (SRM)", (verdict, "Per segment (query segments count users active in them):"),
                Table(("segment", "value", "users", "p", "verdict"), seg_rows)),
    ]
    label = CORRECTION_LABELS.get(result.correction, result.correction)
    out.append(Section(
        "Summary",
        (f"Experiment `{result.experiment_id}`, control `{result.control}`, days {result.first_day} to "
         f"{result.last_day}; alpha {result.alpha}, {label} across primary and secondary metrics x variants.",
         *(f"- {s}" for s in result.sentences())),
    ))
    out.append(Section("Metrics", ("Relative lifts with 95% CIs; forest plot below.",), _metric_table(result.metrics), "forest"))
    exclusion_lines = tuple(
        f"- {e.table}: {e.reason}: {e.rows:,} rows ({e.users:,} users), e.g. {', '.join(e.examples)}"
        for e in result.exclusions
    ) or ("No rows were excluded.",)
    recon = ", ".join(f"{k} {v:,}" for k, v in result.reconciliation.items())
    out.append(Section("Data checks", (*exclusion_lines, f"Counts: {recon}.")))
    if result.days:
        out.append(Section("Day since exposure", ("Relative lift by day since each user's first exposure "
                                                  "(users observable on that day; no CUPED).",), None, "days"))
    if result.segments:
        out.append(Section("Segments", (), _metric_table(result.segments, with_slice=True)))
    out.append(Section("Method", tuple(f"- {note}" for note in METHOD_NOTES)))
    return out


def forest_plot(rows: Sequence[MetricResult]) -> bytes:
    """PNG: relative lift and CI per metric (and variant), tiers marked, zero line."""
    rows = [r for r in rows if math.isfinite(r.rel_effect)]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    colours = {"primary": "tab:blue", "secondary": "tab:gray", "guardrail": "tab:orange"}
    for i, r in enumerate(reversed(rows)):
        lo, hi = r.rel_ci_low * 100, r.rel_ci_high * 100
        ax.errorbar(r.rel_effect * 100, i, xerr=[[r.rel_effect * 100 - lo], [hi - r.rel_effect * 100]],
                    fmt="o", color=colours[r.tier], capsize=3)
    ax.set_yticks(range(len(rows)), [f"{r.metric} ({r.variant}, {r.tier})" for r in reversed(rows)])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("relative lift, % (95% CI)")
    fig.tight_layout()
    return _png(fig)


def days_plot(rows: Sequence[MetricResult]) -> bytes:
    """PNG: relative lift by day since exposure, one line with a CI band per metric and variant."""
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted({(r.metric, r.variant) for r in rows})
    for metric, variant in keys:
        series = [r for r in rows if (r.metric, r.variant) == (metric, variant) and math.isfinite(r.rel_effect)]
        days = [int(r.slice_value) for r in series]
        ax.plot(days, [r.rel_effect * 100 for r in series], marker=".", label=f"{metric} ({variant})")
        ax.fill_between(days, [r.rel_ci_low * 100 for r in series], [r.rel_ci_high * 100 for r in series], alpha=0.1)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("day since first exposure")
    ax.set_ylabel("relative lift, %")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _png(fig)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def images(result: ExperimentResult) -> dict[str, bytes]:
    out = {"forest": forest_plot(result.metrics)}
    if result.days:
        out["days"] = days_plot([r for r in result.days if r.tier == "primary"] or list(result.days))
    return out


def to_markdown(result: ExperimentResult, image_files: dict[str, str], provenance: Provenance) -> str:
    """Markdown; images are linked as files (`image_files`: key -> relative path)."""
    parts = [f"# A/B analysis: {result.experiment_id}"]
    for s in sections(result):
        parts.append(f"## {s.title}")
        for line in s.lines:  # consecutive list items form one block
            if line.startswith("- ") and parts[-1].startswith("- "):
                parts[-1] += "\n" + line
            else:
                parts.append(line)
        if s.table is not None and s.table.rows:
            parts.append("| " + " | ".join(s.table.header) + " |\n|" + "---|" * len(s.table.header))
            parts[-1] += "".join("\n| " + " | ".join(row) + " |" for row in s.table.rows)
            parts.extend(s.table.notes)
        if s.image in image_files:
            parts.append(f"![{s.image}]({image_files[s.image]})")
    parts += ["---", provenance.line()]
    return "\n\n".join(parts) + "\n"


def _inline_md(text: str) -> str:
    escaped = html.escape(text)
    for mark, tag in (("**", "strong"), ("`", "code")):
        pieces = escaped.split(mark)
        escaped = "".join(p if i % 2 == 0 else f"<{tag}>{p}</{tag}>" for i, p in enumerate(pieces))
    return escaped


def _html_lines(lines: Sequence[str]) -> list[str]:
    """Paragraphs, with each run of consecutive '- ' items as one list, in their order."""
    out: list[str] = []
    items: list[str] = []
    for line in (*lines, ""):  # the empty sentinel closes a list that ends the section
        if line.startswith("- "):
            items.append(f"<li>{_inline_md(line[2:])}</li>")
            continue
        if items:
            out.append(f"<ul>{''.join(items)}</ul>")
            items = []
        if line:
            out.append(f"<p>{_inline_md(line)}</p>")
    return out


def to_html(result: ExperimentResult, pngs: dict[str, bytes], provenance: Provenance) -> str:
    """One self-contained HTML page (no external files or scripts)."""
    body = [f"<h1>A/B analysis: {html.escape(result.experiment_id)}</h1>"]
    for s in sections(result):
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        body.extend(_html_lines(s.lines))
        if s.table is not None and s.table.rows:
            head = "".join(f"<th>{html.escape(h)}</th>" for h in s.table.header)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in s.table.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            body.extend(f"<p class='note'>{html.escape(note)}</p>" for note in s.table.notes)
        if s.image in pngs:
            data = base64.b64encode(pngs[s.image]).decode("ascii")
            body.append(f'<img alt="{s.image}" src="data:image/png;base64,{data}">')
    body.append(f"<footer>{html.escape(provenance.line())}</footer>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
             "th{background:#f3f3f3}strong{color:#b00}p.note{font-size:12px;color:#555;margin:0.2em 0}"
             "footer{border-top:1px solid #ccc;margin-top:2em;padding-top:0.5em;color:#555;font-size:12px}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>A/B analysis {html.escape(result.experiment_id)}"
            f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def write_reports(result: ExperimentResult, out: str | Path, provenance: Provenance | None = None) -> dict[str, Path]:
    """Write report.md (+ PNGs), report.html (self-contained) and result.json into `out`;
    `provenance` defaults to this process's command line, now."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    provenance = provenance or Provenance.now()
    pngs = images(result)
    files = {}
    for key, data in pngs.items():
        (out / f"{key}.png").write_bytes(data)
        files[key] = f"{key}.png"
    paths = {"markdown": out / "report.md", "html": out / "report.html", "json": out / "result.json"}
    paths["markdown"].write_text(to_markdown(result, files, provenance), encoding="utf-8")
    paths["html"].write_text(to_html(result, pngs, provenance), encoding="utf-8")
    document = {**result.to_dict(), "provenance": dataclasses.asdict(provenance)}
    paths["json"].write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return paths
