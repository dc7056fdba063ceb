"""``cavga report``: one self-contained HTML page of an evaluation (or prediction) run.

The page holds the metrics table, image and pixel ROC curves and score histograms of normal vs anomalous
images with the calibrated threshold (inline SVG, computed with numpy), and a gallery of overlays that plain
JavaScript sorts and filters by score, label, defect type and correct/incorrect. Nothing is fetched from the
network: images are embedded as data URIs or linked as files beside the page.

A run directory is what ``cavga evaluate --out`` writes (metrics.json, predictions.jsonl, curves.json,
overlays/) or ``cavga predict --out`` (predictions.jsonl, overlays/), or a folder holding several of them
(``cavga demo``'s ``predictions/<category>/``, with the per-category metrics in its metrics.json).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cavga.errors import DataError
from cavga.metrics import THRESHOLD, curve_area, roc_curve
from cavga.report.outputs import CURVES_FILE, METRIC_KEYS, PREDICTIONS_FILE

REPORT_FILE = "report.html"
LABEL_THUMBNAIL_SIDE = 160  # pixels: the known-defect images of a weakly supervised model, shown small
EMBED_LIMIT_BYTES = 20_000_000  # above this many bytes of overlays, link the files instead of embedding them
# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
NORMAL_COLOUR, ANOMALOUS_COLOUR = "#0072B2", "#D55E00"


# --------------------------------------------------------------------------- curves


def histogram(scores: np.ndarray, bins: int = 20) -> np.ndarray:
    """Counts of ``scores`` in ``bins`` equal bins over [0, 1] (1.0 falls in the last bin)."""
    counts, _ = np.histogram(np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    return counts


# --------------------------------------------------------------------------- reading runs


@dataclass
class Run:
    """One evaluated (or predicted) set of images: its files and what the report shows of it."""

    name: str
    directory: Path
    predictions: list[dict]
    metrics: dict | None = None
    curves: dict = field(default_factory=dict)

    @property
    def has_truth(self) -> bool:
        return bool(self.predictions) and all("gt_label" in p for p in self.predictions)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable JSON ({exc})") from exc


def _read_predictions(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable predictions ({exc})") from exc


def find_runs(run_dir: str | os.PathLike) -> tuple[list[Run], dict | None]:
    """The runs under ``run_dir`` and its own metrics.json (None if absent).

    A folder with predictions.jsonl is one run; otherwise every sub-folder that has one is a run, named after
    that sub-folder, taking its metrics from its own metrics.json or else from ``per_category`` of the top one.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise DataError(f"{root}: no such run directory")
    top_metrics = _read_json(root / "metrics.json")
    if (root / PREDICTIONS_FILE).is_file():
        dirs = [root]
    else:
        dirs = sorted(p.parent for p in root.rglob(PREDICTIONS_FILE))
    if not dirs:
        raise DataError(f"{root}: no {PREDICTIONS_FILE} here or below (run cavga evaluate or predict first)")
    per_category = (top_metrics or {}).get("per_category", {})
    runs = []
    for d in dirs:
        name = d.name if d != root else root.resolve().name
        metrics = _read_json(d / "metrics.json") if d != root else top_metrics
        if metrics is None:
            metrics = per_category.get(d.name)
        runs.append(Run(name, d, _read_predictions(d / PREDICTIONS_FILE), metrics, _read_json(d / CURVES_FILE) or {}))
    return runs, top_metrics


# --------------------------------------------------------------------------- SVG


def _fmt(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def svg_roc(title: str, curves: list[tuple[str, np.ndarray, np.ndarray]], size: int = 300) -> str:
    """An inline SVG of ROC curves ``(name, fpr, tpr)``, each in its own colour, with the chance diagonal."""
    left, top, right, bottom = 44, 28, 12, 40
    w = h = size
    pw, ph = w - left - right, h - top - bottom

    def xy(fx: float, ty: float) -> str:
        return f"{_fmt(left + fx * pw)},{_fmt(top + (1 - ty) * ph)}"

    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{w / 2}" y="16" text-anchor="middle" class="title">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>',
    ]
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, y = left + t * pw, top + (1 - t) * ph
        parts.append(f'<line x1="{_fmt(x)}" y1="{top}" x2="{_fmt(x)}" y2="{top + ph}" class="grid"/>')
        parts.append(f'<line x1="{left}" y1="{_fmt(y)}" x2="{left + pw}" y2="{_fmt(y)}" class="grid"/>')
        parts.append(f'<text x="{_fmt(x)}" y="{top + ph + 14}" text-anchor="middle">{t:g}</text>')
        parts.append(f'<text x="{left - 5}" y="{_fmt(y + 4)}" text-anchor="end">{t:g}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{h - 6}" text-anchor="middle">false positive rate</text>')
    parts.append(
        f'<text transform="translate(12 {top + ph / 2}) rotate(-90)" text-anchor="middle">true positive rate</text>'
    )
    parts.append(f'<polyline points="{xy(0, 0)} {xy(1, 1)}" class="chance"/>')
    if not curves:
        parts.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle">not available</text>')
    for i, (name, fpr, tpr) in enumerate(curves):
        colour = PALETTE[i % len(PALETTE)]
        points = " ".join(xy(float(a), float(b)) for a, b in zip(fpr, tpr, strict=True))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        label = f"{name} ({curve_area(fpr, tpr):.3f})"
        y = top + ph - 10 - 14 * (len(curves) - 1 - i)
        parts.append(
            f'<line x1="{left + pw - 118}" y1="{y - 4}" x2="{left + pw - 104}" y2="{y - 4}" '
            f'stroke="{colour}" stroke-width="3"/>'
        )
        parts.append(f'<text x="{left + pw - 100}" y="{y}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_histogram(
    title: str, normal: np.ndarray, anomalous: np.ndarray, threshold: float, bins: int = 20, size: int = 300
) -> str:
    """An inline SVG of normalized-score histograms: normal and anomalous bars side by side per bin, and the
    decision threshold as a dashed line."""
    left, top, right, bottom = 44, 28, 12, 58
    w, h = size, int(size * 0.85)
    pw, ph = w - left - right, h - top - bottom
    counts_n, counts_a = histogram(normal, bins), histogram(anomalous, bins)
    peak = max(1, int(max(counts_n.max(initial=0), counts_a.max(initial=0))))
    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{w / 2}" y="16" text-anchor="middle" class="title">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>',
    ]
    bin_w = pw / bins
    for counts, colour, offset in ((counts_n, NORMAL_COLOUR, 0.0), (counts_a, ANOMALOUS_COLOUR, 0.5)):
        for b, c in enumerate(counts):
            if c == 0:
                continue
            bh = ph * c / peak
            x = left + (b + offset) * bin_w
            parts.append(
                f'<rect x="{_fmt(x)}" y="{_fmt(top + ph - bh)}" width="{_fmt(bin_w / 2)}" height="{_fmt(bh)}" '
                f'fill="{colour}"><title>{int(c)} image(s) in [{b / bins:g}, {(b + 1) / bins:g})</title></rect>'
            )
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{_fmt(left + t * pw)}" y="{top + ph + 14}" text-anchor="middle">{t:g}</text>')
    parts.append(f'<text x="{left - 5}" y="{top + 4}" text-anchor="end">{peak}</text>')
    parts.append(f'<text x="{left - 5}" y="{top + ph + 4}" text-anchor="end">0</text>')
    tx = left + threshold * pw
    parts.append(f'<line x1="{_fmt(tx)}" y1="{top}" x2="{_fmt(tx)}" y2="{top + ph}" class="threshold"/>')
    parts.append(f'<text x="{_fmt(tx + 4)}" y="{top + 12}">threshold {threshold:g}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{top + ph + 28}" text-anchor="middle">normalized anomaly score</text>')
    x = left
    for name, colour, n in (("normal", NORMAL_COLOUR, len(normal)), ("anomalous", ANOMALOUS_COLOUR, len(anomalous))):
        parts.append(f'<rect x="{x}" y="{h - 22}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{x + 14}" y="{h - 13}">{name} ({n})</text>')
        x += 110
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.5em; margin: 0 0 .2em; } h2 { font-size: 1.15em; margin: 1.4em 0 .5em; }
.meta { color: #666; margin: 0 0 1em; }
table.metrics { border-collapse: collapse; background: #fff; }
table.metrics th, table.metrics td { border: 1px solid #ddd; padding: .3em .6em; text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
table.metrics tr.mean td { font-weight: 600; background: #f0f0f0; }
table.metrics tr.per-object td { font-style: italic; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
svg.chart { background: #fff; border: 1px solid #ddd; font-size: 11px; }
svg.chart .title { font-weight: 600; font-size: 12px; }
svg.chart .frame { fill: none; stroke: #999; } svg.chart .grid { stroke: #eee; }
svg.chart .chance { fill: none; stroke: #aaa; stroke-dasharray: 4 3; }
svg.chart .threshold { stroke: #222; stroke-width: 1.5; stroke-dasharray: 5 3; }
.controls { display: flex; flex-wrap: wrap; gap: 1em; align-items: center; margin-bottom: .8em; }
.controls label { display: flex; gap: .3em; align-items: center; }
#gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 10px; }
.card { margin: 0; background: #fff; border: 2px solid #ddd; border-radius: 4px; padding: 4px; }
.card.incorrect { border-color: #D55E00; } .card.correct { border-color: #9c9; }
.card img { width: 100%; image-rendering: pixelated; display: block; }
.card figcaption { font-size: 12px; margin-top: 3px; overflow-wrap: anywhere; }
.card .score { font-weight: 600; } .card .bad { color: #D55E00; font-weight: 600; }
.legend span { display: inline-block; margin-right: 1.2em; }
#labels { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 10px; }
.card.label { border-color: #E69F00; border-style: dashed; }
.swatch { display: inline-block; width: 12px; height: 12px; vertical-align: middle; margin-right: 4px; }
"""

_JS = """
(function () {
  var gallery = document.getElementById("gallery");
  var cards = Array.prototype.slice.call(gallery.querySelectorAll(".card"));
  var filters = { label: "f-label", defect: "f-defect", outcome: "f-outcome", run: "f-run", pred: "f-pred" };
  function value(id) { var el = document.getElementById(id); return el ? el.value : "all"; }
  function apply() {
    var shown = 0;
    cards.forEach(function (card) {
      var ok = Object.keys(filters).every(function (key) {
        var want = value(filters[key]);
        return want === "all" || card.dataset[key] === want;
      });
      card.hidden = !ok;
      if (ok) { shown += 1; }
    });
    document.getElementById("shown").textContent = shown + " of " + cards.length + " images";
  }
  function sort() {
    var how = value("sort");
    var sorted = cards.slice().sort(function (a, b) {
      if (how === "name") { return a.dataset.name < b.dataset.name ? -1 : (a.dataset.name > b.dataset.name ? 1 : 0); }
      var d = parseFloat(a.dataset.score) - parseFloat(b.dataset.score);
      return how === "score-asc" ? d : -d;
    });
    sorted.forEach(function (card) { gallery.appendChild(card); });
  }
  Object.keys(filters).forEach(function (key) {
    var el = document.getElementById(filters[key]);
    if (el) { el.addEventListener("change", apply); }
  });
  document.getElementById("sort").addEventListener("change", sort);
  sort();
  apply();
})();
"""


def _metric_cell(key: str, value) -> str:
    if value is None:
        return "<td>-</td>"
    return f"<td>{value}</td>" if key == "n_images" else f"<td>{float(value):.3f}</td>"


def _metrics_table(runs: list[Run], top: dict | None) -> str:
    rows = [(run.name, run.metrics, "") for run in runs if run.metrics]
    if top and len(runs) > 1 and any(top.get(k) is not None for k in METRIC_KEYS):
        rows.append(("mean", top, "mean"))
    for name, m, _ in list(rows):  # an object shown in several images (a tile's exposures) counted once
        if m.get("per_group"):
            g = m["per_group"]
            rows.append((f"{name}, per object", {**g, "n_images": f"{g['n_groups']} objects"}, "per-object"))
    if not rows:
        return "<p>No metrics: these images had no ground truth (a prediction run).</p>"
    head = "".join(f"<th>{k}</th>" for k in METRIC_KEYS)
    body = "".join(
        f'<tr class="{cls}"><td>{html.escape(name)}</td>'
        + "".join(_metric_cell(k, m.get(k)) for k in METRIC_KEYS)
        + "</tr>"
        for name, m, cls in rows
    )
    return f'<table class="metrics"><thead><tr><th>run</th>{head}</tr></thead><tbody>{body}</tbody></table>'


def _image_roc(run: Run) -> tuple[np.ndarray, np.ndarray] | None:
    stored = run.curves.get("image_roc")
    if stored:
        return np.asarray(stored["fpr"]), np.asarray(stored["tpr"])
    if not run.has_truth:
        return None
    labels = np.array([bool(p["gt_label"]) for p in run.predictions])
    if labels.all() or not labels.any():
        return None
    return roc_curve(np.array([p["pred_score"] for p in run.predictions]), labels)


def _predicted(p: dict) -> str:
    """The predicted label of a predictions.jsonl line in the words the page uses ("normal", "anomalous")."""
    return "anomalous" if p["pred_label"] else "normal"


def _image_src(run: Run, relative: str, report_dir: Path, embed: bool) -> str:
    path = run.directory / relative
    if embed:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return Path(os.path.relpath(path, report_dir)).as_posix()


def _truth(p: dict) -> str | None:
    """The true label of a predictions.jsonl line (``gt_label`` 0/1) in the page's words; None where it has none."""
    return None if p.get("gt_label") is None else ("anomalous" if p["gt_label"] else "normal")


def _select(element_id: str, label: str, options: list[tuple[str, str]]) -> str:
    items = "".join(f'<option value="{html.escape(v)}">{html.escape(t)}</option>' for v, t in options)
    return f'<label>{label} <select id="{element_id}">{items}</select></label>'


def _gallery(runs: list[Run], report_dir: Path, embed: bool) -> str:
    with_truth = all(run.has_truth for run in runs)
    cards = []
    for run in runs:
        for i, p in enumerate(run.predictions):
            image = p.get("overlay") or p.get("heatmap")
            if image is None or not (run.directory / image).is_file():
                continue
            name = Path(p["path"]).name
            truth = _truth(p)
            defect = p.get("defect_type") or ("-" if truth is None else truth)
            correct = p.get("correct")
            outcome = "unknown" if correct is None else ("correct" if correct else "incorrect")
            title = html.escape(p["path"])
            predicted = _predicted(p)
            lines = [f'<span class="score">score {p["pred_score"]:.3f}</span> &middot; predicted {predicted}']
            if truth is not None:
                verdict = "correct" if correct else '<span class="bad">incorrect</span>'
                lines.append(f"true {html.escape(truth)} ({html.escape(defect)}) &middot; {verdict}")
            if len(runs) > 1:
                lines.append(f"run {html.escape(run.name)}")
            lines.append(html.escape(name))
            cards.append(
                f'<figure class="card {outcome}" data-score="{p["pred_score"]:.6f}" data-name="{html.escape(run.name)}/'
                f'{i:06d}" data-label="{html.escape(truth or predicted)}" data-pred="{predicted}" '
                f'data-defect="{html.escape(defect)}" data-outcome="{outcome}" data-run="{html.escape(run.name)}">'
                f'<img src="{_image_src(run, image, report_dir, embed)}" alt="{title}" title="{title}" '
                f'loading="eager"><figcaption>{"<br>".join(lines)}</figcaption></figure>'
            )
    defects = sorted({c.split('data-defect="', 1)[1].split('"', 1)[0] for c in cards})
    controls = [
        _select(
            "sort",
            "sort by",
            [("score-desc", "score, high first"), ("score-asc", "score, low first"), ("name", "file order")],
        ),
        _select(
            "f-label",
            "true label" if with_truth else "label",
            [("all", "all"), ("normal", "normal"), ("anomalous", "anomalous")],
        ),
        _select("f-pred", "predicted", [("all", "all"), ("normal", "normal"), ("anomalous", "anomalous")]),
    ]
    if with_truth:
        controls.append(_select("f-defect", "defect type", [("all", "all")] + [(d, d) for d in defects]))
        controls.append(
            _select("f-outcome", "decision", [("all", "all"), ("correct", "correct"), ("incorrect", "incorrect")])
        )
    if len(runs) > 1:
        controls.append(_select("f-run", "run", [("all", "all")] + [(r.name, r.name) for r in runs]))
    controls.append('<span id="shown"></span>')
    legend = (
        '<p class="legend"><span>overlay: anomaly map in colour (blue low, red high)</span>'
        '<span><i class="swatch" style="background:#fff;border:1px solid #999"></i>predicted mask contour</span>'
        '<span><i class="swatch" style="background:#f0f"></i>ground-truth contour</span></p>'
    )
    return f'<div class="controls">{"".join(controls)}</div>{legend}<div id="gallery">{"".join(cards)}</div>'


def labelled_images(runs: list[Run], top_metrics: dict | None) -> list[str]:
    """The images a weakly supervised model was given as known defects (``labelled_images`` of the evaluation's
    metrics.json), each once, in order."""
    sources = [top_metrics, *(r.metrics for r in runs)]
    return list(dict.fromkeys(p for m in sources for p in (m or {}).get("labelled_images", [])))


def _thumbnail(path: Path) -> str | None:
    """``path`` shrunk to LABEL_THUMBNAIL_SIDE as a JPEG data URI; None where the file is gone or unreadable."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((LABEL_THUMBNAIL_SIDE, LABEL_THUMBNAIL_SIDE))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
    except (OSError, UnidentifiedImageError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _labels_section(paths: list[str]) -> str:
    """The known-defect images of a weakly supervised model, apart from the gallery: they trained it, so they count
    in no metric and no chart."""
    if not paths:
        return ""
    cards = []
    for path in paths:
        src, name = _thumbnail(Path(path)), html.escape(Path(path).name)
        image = f'<img src="{src}" alt="{name}" title="{html.escape(path)}">' if src else "(file not found)"
        cards.append(f'<figure class="card label">{image}<figcaption>label &middot; {name}</figcaption></figure>')
    return (
        f'<h2>Known defects given as labels</h2><p class="meta">{len(paths)} image(s) labelled defective (no masks) '
        "trained this model (setting w). They, and other exposures of the same object, are left out of the "
        f'metrics, the charts and the gallery.</p><div id="labels">{"".join(cards)}</div>'
    )


def build_report(
    runs: list[Run],
    out: str | os.PathLike,
    top_metrics: dict | None = None,
    title: str | None = None,
    embed: bool | None = None,
) -> Path:
    """Write the report page of ``runs`` to ``out``. ``embed`` None: embed the overlays as data URIs unless they
    exceed EMBED_LIMIT_BYTES together, then link them as files relative to the page."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if embed is None:
        total = sum(
            (run.directory / p["overlay"]).stat().st_size
            for run in runs
            for p in run.predictions
            if p.get("overlay") and (run.directory / p["overlay"]).is_file()
        )
        embed = total <= EMBED_LIMIT_BYTES
    threshold = next((float(r.curves["threshold"]) for r in runs if "threshold" in r.curves), THRESHOLD)
    image_rocs = [(r.name, *roc) for r in runs if (roc := _image_roc(r)) is not None]
    pixel_rocs = [
        (r.name, np.asarray(r.curves["pixel_roc"]["fpr"]), np.asarray(r.curves["pixel_roc"]["tpr"]))
        for r in runs
        if r.curves.get("pixel_roc")
    ]
    hists = []
    for r in runs:
        labels = [_truth(p) if r.has_truth else _predicted(p) for p in r.predictions]
        normal = np.array([p["pred_score"] for p, t in zip(r.predictions, labels, strict=True) if t == "normal"])
        anomalous = np.array([p["pred_score"] for p, t in zip(r.predictions, labels, strict=True) if t == "anomalous"])
        what = "" if r.has_truth else " (by predicted label: no ground truth)"
        hists.append(svg_histogram(f"{r.name}: scores{what}", normal, anomalous, threshold))
    title = title or f"cavga report: {', '.join(r.name for r in runs)}"
    n_images = sum(len(r.predictions) for r in runs)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # noqa: UP017 (py3.10 has no UTC alias)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{html.escape(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta">{n_images} images in {len(runs)} run(s) &middot; generated {stamp} by cavga &middot; scores are
normalized on normal training images only; an image is called anomalous above the threshold {threshold:g}</p>
<h2>Metrics</h2>
{_metrics_table(runs, top_metrics)}
<h2>ROC curves</h2>
<div class="charts">
{svg_roc("image-level ROC (AuROC)", image_rocs)}
{svg_roc("pixel-level ROC (AuROC)", pixel_rocs)}
</div>
<h2>Score histograms</h2>
<div class="charts">{"".join(hists)}</div>
<h2>Gallery</h2>
{_gallery(runs, out.parent, embed)}
{_labels_section(labelled_images(runs, top_metrics))}
<script>{_JS}</script>
</body></html>
"""
    out.write_text(page, encoding="utf-8")
    return out


def write_report(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    title: str | None = None,
    embed: bool | None = None,
) -> Path:
    """Find the runs in ``run_dir`` and write their report (default ``run_dir/report.html``)."""
    runs, top = find_runs(run_dir)
    return build_report(runs, out or Path(run_dir) / REPORT_FILE, top, title, embed)
