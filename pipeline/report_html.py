"""OUTPUT/report.html: one self-contained page (inline CSS, thumbnails as data URIs,
inline SVG charts, no script) that opens from disk or object storage alike.

Everything that comes from a manifest or an output (ids, prompts, messages, settings)
is HTML-escaped; the page's Content-Security-Policy also forbids scripts outright.
"""

from __future__ import annotations

import json
import logging
import math
import time
from html import escape

from pipeline.report_data import ReportData, Thumb, gather
from pipeline.report_svg import Bar, BarGroup, bar_list, column_chart, histogram
from pipeline.resume import NoJob
from pipeline.runs import RunInfo
from pipeline.score_stats import describe, stats_of
from pipeline.storage import filesystem, join, redact, write_atomic

log = logging.getLogger("genfleet")
REPORT_FILE = "report.html"
BIN_SECONDS = (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)
MAX_BINS = 120  # across the runs shown
MAX_RUNS_PLOTTED = 8
MAX_FILES_LISTED = 5  # new manifest files named per run (a first night sees them all)

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1200px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}
.sub{color:#5a6272}.state{display:inline-block;padding:2px 10px;border-radius:10px;background:#dde6f3;font-weight:600}
.state.completed{background:#d5f0dc}.state.failed,.state.stopped,.state.dead,.state.interrupted{background:#f7d9d9}.state.incomplete{background:#f6ecc9}
.cards{display:grid;grid-template-columns:repeat(8,1fr);gap:8px}
.card{background:#fff;border:1px solid #e2e5ea;border-radius:6px;padding:8px 10px}
.card b{display:block;font-size:20px}.card span{color:#5a6272;font-size:12px}
table{border-collapse:collapse;width:100%;background:#fff;table-layout:auto}
th,td{border:1px solid #e2e5ea;padding:4px 8px;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#eef1f5;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
code,pre{font:12px/1.4 ui-monospace,monospace}pre{margin:0;white-space:pre-wrap;overflow-wrap:anywhere}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:10px}
figure{margin:0;background:#fff;border:1px solid #e2e5ea;border-radius:6px;padding:6px;overflow:hidden}
figure img,figure .noimg{width:100%;aspect-ratio:1;object-fit:contain;background:#eee;display:block}
figure .noimg{display:flex;align-items:center;justify-content:center;color:#a33}
figcaption{font-size:12px;margin-top:4px;overflow-wrap:anywhere}
figcaption .prompt{display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical;overflow:hidden}
figcaption .meta{color:#5a6272}
.chart{background:#fff;border:1px solid #e2e5ea;border-radius:6px;padding:8px}
"""


def esc(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    return f"{s // 3600}h {s // 60 % 60:02d}m {s % 60:02d}s" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def _table(head: list[str], rows: list[list[str]], numeric: frozenset[int] = frozenset(), widths: tuple[str, ...] = ()) -> str:
    """`rows` hold HTML already escaped; `widths` (CSS, per column) fix the layout across tables."""
    cols = "<colgroup>" + "".join(f'<col style="width:{w}">' for w in widths) + "</colgroup>" if widths else ""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r)) + "</tr>"
                   for r in rows)
    fixed = ' style="table-layout:fixed"' if widths else ""
    return f"<table{fixed}>{cols}<thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _json(value: object) -> str:
    return f"<pre>{esc(json.dumps(value, indent=1, sort_keys=True, default=str))}</pre>"


def settings_section(d: ReportData) -> str:
    fp = d.job.get("fingerprint", {})
    rows = [[esc(k), esc(v)] for k, v in (("family", fp.get("family")), ("model", fp.get("model")), ("manifest", d.job.get("manifest")),
                                           ("seed", fp.get("seed")), ("image format", fp.get("image_format")),
                                           ("quality", fp.get("quality")), ("max prompt chars", fp.get("max_prompt_chars")))]
    rows.append(["sampler", _json(fp.get("sampler") or {})])
    stages = [[f"<code>{esc(name)}</code>", esc(p.get("device")), esc(p.get("dtype")), _json(p.get("options") or {})]
              for name, p in (fp.get("stages") or {}).items()]
    stages += [[f"<code>score</code> ({esc(name)})", esc(p.get("device")), esc(p.get("dtype")), _json({"model fingerprint": p.get("model")})]
               for name, p in (fp.get("scores") or {}).items()]  # the job's score stage (scores: in the spec)
    return (f'<h2>Job</h2>{_table(["setting", "value"], rows)}<h3>Stages and placement</h3>'
            f'{_table(["stage", "device", "dtype", "options"], stages)}')


def counts_section(d: ReportData) -> str:
    cards = "".join(f'<div class="card"><b>{v:,}</b><span>{esc(k)}</span></div>' for k, v in d.counts.items())
    return f'<h2>Counts</h2><div class="cards" id="counts">{cards}</div>'


def _new_files(r: RunInfo) -> str:
    """The manifest files new in this run (the first few of many); "-" when not recorded (an older version's run)."""
    if not r.entry.recorded:
        return "-"
    files = r.entry.new_manifest_files
    more = f" and {len(files) - MAX_FILES_LISTED:,} more" if len(files) > MAX_FILES_LISTED else ""
    return (", ".join(f"<code>{esc(f)}</code>" for f in files[:MAX_FILES_LISTED]) + esc(more) or "none") + \
        f' <span class="sub">(of {r.entry.manifest_files:,})</span>'


def runs_section(d: ReportData) -> str:
    rows = [[str(r.number), esc(_utc(r.started_at)), f'<span class="state {esc(r.state)}">{esc(r.state)}</span>',
             esc(_duration(r.wall_seconds)), esc(r.wall_source), f"{r.committed_before:,}", f"{r.committed:,}", _new_files(r),
             esc(r.entry.host or "-"), "yes" if r.retry_errors else ""] for r in d.runs]
    head = ["run", "started", "status", "wall time", "wall time from", "committed before", "committed in run", "new manifest files",
            "host", "--retry-errors"]
    total = d.runs[-1].number if d.runs else 0
    note = f'<p class="sub">The last {len(d.runs)} of {total:,} runs.</p>' if len(d.runs) < total else ""
    return f'<h2>Runs</h2><div id="runs">{note}{_table(head, rows, frozenset({0, 5, 6}))}</div>'


def _bin_seconds(runs: list[RunInfo]) -> int:
    spans = [max(r.commits[-1][0] - r.started_at, 1.0) for r in runs]
    return next((b for b in BIN_SECONDS if sum(math.ceil(s / b) for s in spans) <= MAX_BINS), BIN_SECONDS[-1])


def _run_bins(r: RunInfo, width: int) -> list[Bar]:
    counts = [0] * max(math.ceil(max(r.commits[-1][0] - r.started_at, 1.0) / width), 1)
    for at, pairs in r.commits:
        counts[min(max(int((at - r.started_at) // width), 0), len(counts) - 1)] += pairs
    return [Bar(c * 60 / width, f"run {r.number}, {_duration(k * width)} to {_duration((k + 1) * width)}: {c:,} committed")
            for k, c in enumerate(counts)]


def throughput_section(d: ReportData) -> str:
    runs = [r for r in d.runs if r.commits][-MAX_RUNS_PLOTTED:]
    parts = ["<h2>Throughput</h2>"]
    if runs:
        width = _bin_seconds(runs)
        groups = [BarGroup(f"run {r.number}", _run_bins(r, width), ("start", f"+{_duration(r.commits[-1][0] - r.started_at)}"))
                  for r in runs]
        shown = "" if len(runs) == len([r for r in d.runs if r.commits]) else f", the last {len(runs)} runs"
        parts.append(f'<p class="sub">Samples committed per minute, in {_duration(width)} bins from each run\'s start{shown} '
                     f'(shards commit by size or age, so the bars come in steps; hover a bar for its count).</p>'
                     f'<div class="chart" id="throughput">{column_chart(groups, title="samples committed per minute", y_label="samples/min")}</div>')
    else:
        parts.append('<p class="sub" id="throughput">Nothing committed yet.</p>')
    if d.stage_rows_per_second:
        items = list(d.stage_rows_per_second.items())
        parts.append('<h3>Per stage</h3><p class="sub">Samples per busy second of one replica (from the commit stats).</p>'
                     f'<div class="chart" id="stages">{bar_list(items, title="per-stage samples/s", unit="samples/s")}</div>')
    return "".join(parts)


def scores_section(d: ReportData) -> str:
    if d.clip_scores is None:
        return ""
    read, total = d.clip_score_shards
    note = f" (from {read} of {total} image shards)" if read < total else ""
    body = (histogram(d.clip_scores, title="clip_score distribution", x_label="clip_score") if d.clip_scores
            else '<p class="sub">No scores yet.</p>')
    # the numbers: over every committed image when the commit stats have them, else over the values read
    stats, over = d.clip_score_stats, "all committed images (commit stats; quantiles to within 1 point)"
    if stats is None and d.clip_scores:
        stats, over = describe({"clip_score": stats_of("clip_score", d.clip_scores)})["clip_score"], f"the images read{note}"
    table = ""
    if stats:
        table = (f'<div id="clip-score-stats">{_table(list(stats), [[esc(v) for v in stats.values()]], frozenset(range(len(stats))))}'
                 f'<p class="sub">Over {esc(over)}.</p></div>')
    return (f'<h2>CLIP score</h2><p class="sub">Histogram of {len(d.clip_scores):,} images{esc(note)}.</p>{table}'
            f'<div class="chart" id="clip-score">{body}</div>')


def _sampler_text(sampler: str) -> str:
    try:
        params = json.loads(sampler)
    except ValueError:
        return sampler
    return ", ".join(f"{k}={v}" for k, v in params.items()) if isinstance(params, dict) else sampler


def _figure(t: Thumb) -> str:
    sampler = _sampler_text(t.sampler)
    score = "" if t.clip_score is None else f" · clip {t.clip_score:.2f}"
    tip = f"{t.id} #{t.sample_index}\nseed {t.seed}\n{t.prompt or ''}\n{sampler}"
    img = f'<img src="{t.data_uri}" alt="{esc(t.id)}" loading="eager">' if t.data_uri else '<div class="noimg">not decodable</div>'
    return (f'<figure title="{esc(tip)}">{img}<figcaption><code>{esc(t.id)}</code> #{t.sample_index}'
            f'<div class="meta">seed {esc(t.seed)}{esc(score)}</div><div class="prompt">{esc(t.prompt)}</div>'
            f'<div class="meta">{esc(sampler)}</div></figcaption></figure>')


def grid_section(d: ReportData) -> str:
    note = (f"{len(d.thumbs)} of {d.counts['images']:,} images, from the start of {d.thumb_shards} shards spread across the output"
            if d.thumbs else "No images yet.")
    return f'<h2>Samples</h2><p class="sub">{esc(note)}; hover for the full prompt.</p><div class="grid" id="samples">' + \
        "".join(_figure(t) for t in d.thumbs) + "</div>"


def errors_section(d: ReportData) -> str:
    parts = ['<h2>Errors by kind</h2><div id="errors">']
    if not d.errors_by_kind:
        parts.append('<p class="sub">No permanent errors.</p>')
    for kind, n in d.errors_by_kind.items():
        rows = [[f"<code>{esc(e.id)}</code>", esc(e.sample_index if e.sample_index >= 0 else "row"), esc(e.stage), esc(e.message)]
                for e in d.error_examples.get(kind, [])]
        table = _table(["id", "sample", "stage", "message"], rows, widths=("22%", "8%", "12%", "58%"))
        parts.append(f'<h3 class="kind"><code>{esc(kind)}</code>: {n:,}</h3>{table}')
    return "".join(parts) + "</div>"


def render(d: ReportData) -> str:
    head = ('<meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; style-src \'unsafe-inline\'">'
            f"<title>genfleet report: {esc(d.output)}</title><style>{CSS}</style>")
    top = (f'<h1>genfleet report</h1><p class="sub"><code>{esc(d.output)}</code> · <span class="state {esc(d.state)}">{esc(d.state)}</span>'
           f" · generated {esc(_utc(d.generated_at))}</p>")
    sections = [counts_section(d), settings_section(d), runs_section(d), throughput_section(d), scores_section(d), grid_section(d),
                errors_section(d)]
    return f'<!doctype html><html lang="en"><head>{head}</head><body><main>{top}{"".join(sections)}</main></body></html>\n'


def write_report(output: str, out: str | None = None) -> str:
    """Write the report of `output` (to OUTPUT/report.html unless `out`); returns where."""
    html = render(gather(output))
    target = out or join(output, REPORT_FILE)
    fs, path = filesystem(target)
    write_atomic(fs, path, html.encode())
    return target


def write_report_after_run(output: str) -> None:
    """At a run's end: a report that cannot be written never changes how the run ended."""
    try:
        log.info("report: %s", redact(write_report(output)))
    except NoJob:
        pass  # the run stopped before it recorded itself: nothing to report
    except Exception as e:  # noqa: BLE001 - the run's own outcome matters more; say why and go on
        log.warning("report not written: %s: %s", type(e).__name__, redact(str(e)).splitlines()[0] if str(e) else "")
