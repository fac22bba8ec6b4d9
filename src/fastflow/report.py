"""A self-contained HTML report of one evaluation (paper Sections 4.6 and 7: results and bad cases).

    fastflow evaluate RUN_DIR --data ROOT --category NAME --report      # -> report.html beside metrics.json

One HTML file, images embedded as base64 PNG/JPEG, no scripts, no external files:
  * the run: data (format, folder, category), training images (fitted / held out), preset and model, the
    threshold and how it was calibrated (rate, images, by training or ``fastflow calibrate``);
  * the metrics table (with the non-aligned metrics beside, after ``--misalign``);
  * one row per defect type (the test set's folder names): images, median score, share flagged at the
    threshold (detection rate; for normal images the false-alarm rate) and image AUROC of that type
    against all normal test images;
  * image ROC, pixel ROC and PRO curves, and histograms of normal vs anomalous image scores with the
    decision threshold (calibrated on held-out normals at training time) marked;
  * three galleries, like the paper's Figures 3, 5 and 6: the best detections (highest-scored
    anomalies), the missed anomalies (scored at or below the threshold) and the false alarms (normals
    above it). Without a threshold, or when a gallery would be empty, the lowest-scored anomalies /
    highest-scored normals are shown instead, and the heading says so.
Each gallery row shows the de-normalised image, the ground truth (red outline over a red tint) and
the anomaly heatmap over the image (its opacity follows the map, so the part stays visible), at most
``THUMB`` pixels a side; heatmaps share one colour scale.

To look at it as a picture (e.g. on a headless server): ``docs/render_report.sh report.html``; the page
records its height (``<meta name="fastflow-page-height">``) so that the picture shows every gallery.
"""

from __future__ import annotations

import base64
import html
import io
import os
from datetime import datetime, timezone

import numpy as np
from PIL import Image

from .evaluate import Scored
from .run import kept_epochs_text
from .visualize import HEAT_MAX_ALPHA, denormalize, heat_overlay, mask_overlay

THUMB = 256  # pixels, longest side of a gallery thumbnail (JPEG: a report of 72 thumbnails stays ~2 MB)
GALLERY = 8  # images per gallery
PLOT_POINTS = 2000  # curve points drawn (the metrics use all of them)
METRIC_ROWS = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"),
               ("pixel_aupro", "pixel AUPRO (FPR <= 0.3)"), ("image_f1_max", "image F1-max (oracle threshold)"),
               ("threshold", "decision threshold"), ("detection_rate", "detection rate at threshold"),
               ("false_alarm_rate", "false-alarm rate at threshold"),
               ("n_images", "images"), ("n_normal", "normal"), ("n_anomalous", "anomalous"),
               ("n_masked", "images in pixel metrics"), ("ms_per_image", "ms per image")]


def report_path_for(metrics_path: str) -> str:
    """``metrics.json`` -> ``report.html``, ``bottle-metrics.json`` -> ``bottle-report.html`` (same folder)."""
    folder, name = os.path.split(os.path.abspath(metrics_path))
    stem = os.path.splitext(name)[0]
    stem = stem.replace("metrics", "report") if "metrics" in stem else stem + "-report"
    return os.path.join(folder, stem + ".html")


# -- images -----------------------------------------------------------------------------------
def _jpeg(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _png(image: Image.Image | np.ndarray) -> str:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(**kwargs):
    """A matplotlib Figure drawn by the Agg canvas, without pyplot: no global backend or figure state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumb_size(height: int, width: int) -> tuple[int, int]:
    """(H, W) of a gallery picture: the longest side THUMB, the aspect ratio kept."""
    scale = THUMB / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _thumb(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> resized so the longest side is THUMB (small network inputs are enlarged)."""
    h, w = _thumb_size(*rgb.shape[:2])
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))


# -- plots ------------------------------------------------------------------------------------
def _decimate(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= PLOT_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, PLOT_POINTS).round().astype(int))
    return x[keep], y[keep]


def _pixel_sets(scored: Scored) -> tuple[np.ndarray, np.ndarray] | None:
    """Maps and masks the pixel metrics use (as ``evaluate_arrays``); None without any masked anomaly."""
    labels = scored.labels.astype(bool)
    if not (scored.has_mask & labels).any():
        return None
    used = scored.has_mask | ~labels
    return scored.maps[used], scored.masks[used] & labels[used, None, None]


def _num(metrics: dict, key: str) -> float:
    value = metrics.get(key)
    return float("nan") if value is None else float(value)


def curves_png(scored: Scored, metrics: dict) -> str:
    """Image ROC, pixel ROC and PRO curves side by side."""
    from sklearn.metrics import roc_curve

    from .metrics import pro_curve

    fig = _figure(figsize=(13, 4.2))
    axes = fig.subplots(1, 3)
    labels = scored.labels.astype(bool)
    drawn = [False, False, False]
    if labels.any() and not labels.all():
        drawn[0] = True
        fpr, tpr, _ = roc_curve(labels, scored.scores)
        axes[0].plot(fpr, tpr, label=f"AUROC {_num(metrics, 'image_auroc'):.4f}")
    pixels = _pixel_sets(scored)
    if pixels is not None and pixels[1].any() and not pixels[1].all():
        maps, masks = pixels
        drawn[1] = drawn[2] = True
        fpr, tpr, _ = roc_curve(masks.ravel(), maps.ravel())
        axes[1].plot(*_decimate(fpr, tpr), label=f"AUROC {_num(metrics, 'pixel_auroc'):.4f}")
        fpr, pro = pro_curve(maps, masks)
        axes[2].plot(*_decimate(fpr, pro), label=f"AUPRO {_num(metrics, 'pixel_aupro'):.4f}")
        axes[2].axvline(0.3, color="grey", linestyle=":", label="FPR limit 0.3")
    for ax, ok, title, ylabel in zip(axes, drawn, ["image ROC", "pixel ROC", "PRO curve"],
                                     ["true positive rate", "true positive rate", "per-region overlap"]):
        ax.plot([0, 1], [0, 1], color="lightgrey", linestyle="--", linewidth=1)
        ax.set(title=title, xlabel="false positive rate", ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02))
        if ok:
            ax.legend(loc="lower right")
        else:
            ax.text(0.5, 0.5, "not available\n(needs both classes / masks)", ha="center", va="center")
    return _figure_png(fig)


def histogram_png(scored: Scored, threshold: float | None) -> str:
    """Image-score histograms of normal and anomalous images, threshold marked."""
    fig = _figure(figsize=(8, 3.6))
    ax = fig.subplots()
    labels = scored.labels.astype(bool)
    bins = np.histogram_bin_edges(scored.scores, bins=min(40, max(10, len(scored.scores) // 3)))
    ax.hist(scored.scores[~labels], bins=bins, alpha=0.6, color="tab:blue", label=f"normal ({(~labels).sum()})")
    ax.hist(scored.scores[labels], bins=bins, alpha=0.6, color="tab:red", label=f"anomalous ({labels.sum()})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set(xlabel="image score (max of the anomaly map)", ylabel="images", title="image scores")
    ax.legend()
    return _figure_png(fig)


# -- galleries --------------------------------------------------------------------------------
def select_galleries(scored: Scored, threshold: float | None, limit: int = GALLERY
                     ) -> list[tuple[str, str, list[int]]]:
    """(title, note, indices) of the three galleries; see the module docstring for the rules."""
    labels = scored.labels.astype(bool)
    scores = scored.scores
    anomalous, normal = np.flatnonzero(labels), np.flatnonzero(~labels)

    def by_score(idx: np.ndarray, descending: bool) -> np.ndarray:
        return idx[np.argsort(-scores[idx] if descending else scores[idx], kind="stable")]

    has_t = threshold is not None and np.isfinite(threshold)
    best = by_score(anomalous, True)[:limit]
    galleries = [("Best detections", "highest-scored anomalous images", best)]
    missed = by_score(anomalous[scores[anomalous] <= threshold], False) if has_t else anomalous[:0]
    if len(missed):
        note = f"{len(missed)} anomalous image(s) scored at or below the threshold {threshold:.4g}, lowest first"
    else:
        missed = by_score(anomalous, False)
        note = (f"no anomalous image is at or below the threshold {threshold:.4g}; " if has_t else "no threshold; ") \
            + "the lowest-scored anomalous images instead"
    galleries.append(("Missed anomalies", note, missed[:limit]))
    alarms = by_score(normal[scores[normal] > threshold], True) if has_t else normal[:0]
    if len(alarms):
        note = f"{len(alarms)} normal image(s) scored above the threshold {threshold:.4g}, highest first"
    else:
        alarms = by_score(normal, True)
        note = (f"no normal image is above the threshold {threshold:.4g}; " if has_t else "no threshold; ") \
            + "the highest-scored normal images instead"
    galleries.append(("False alarms", note, alarms[:limit]))
    return [(title, note, [int(i) for i in idx]) for title, note, idx in galleries]


def _gallery_html(title: str, note: str, indices: list[int], scored: Scored, dataset, mean, std,
                  vmin: float, vmax: float, threshold: float | None) -> str:
    rows = []
    for i in indices:
        rgb = denormalize(dataset[i]["image"], mean, std)
        thumbs = [_thumb(rgb), _thumb(mask_overlay(rgb, scored.masks[i])),
                  _thumb(heat_overlay(rgb, scored.maps[i], vmin, vmax))]
        verdict = "" if threshold is None or not np.isfinite(threshold) else \
            (" &middot; <b>flagged</b>" if scored.scores[i] > threshold else " &middot; passed")
        mask_note = "" if scored.has_mask[i] or not scored.labels[i] else " &middot; no mask"
        caption = (f"<div class='cap'><code>{html.escape(os.path.basename(scored.paths[i]))}</code> "
                   f"<span class='dir'>{html.escape(os.path.dirname(scored.paths[i]))}</span><br>"
                   f"{'anomalous' if scored.labels[i] else 'normal'} &middot; score {scored.scores[i]:.4g}"
                   f"{verdict}{mask_note}</div>")
        cells = "".join(f"<td><img src='{_jpeg(t)}' alt='{alt}'></td>"
                        for t, alt in zip(thumbs, ["image", "ground truth", "heatmap"]))
        rows.append(f"<tr><td>{caption}</td>{cells}</tr>")
    body = "".join(rows) if rows else "<tr><td colspan='4'>no images of this kind in the test set</td></tr>"
    return (f"<h2>{html.escape(title)}</h2><p class='note'>{html.escape(note)}</p>"
            f"<table class='gallery'><tr><th></th><th>image</th><th>ground truth</th><th>anomaly map</th></tr>"
            f"{body}</table>")


# -- run and defect types -------------------------------------------------------------------
def defect_types_from_paths(paths: list[str]) -> list[str]:
    """Each test image's defect type: the name of its folder (``test/scratch/003.png`` -> ``scratch``)."""
    return [os.path.basename(os.path.dirname(p)) or "?" for p in paths]


def per_defect_type(scored: Scored, types: list[str], threshold: float | None) -> list[dict]:
    """One row per defect type, normal types first: images, median image score, share flagged at the
    threshold (the detection rate of a defect type, the false-alarm rate of normal images; None without a
    threshold) and the image AUROC of the type's images against all normal test images (anomalous types
    with normal images to compare; else None). A NaN score counts as the highest (as ``predict`` does)."""
    from sklearn.metrics import roc_auc_score

    types = np.asarray(types, dtype=object)
    labels = scored.labels.astype(bool)
    finite = scored.scores[np.isfinite(scored.scores)]
    scores = np.nan_to_num(scored.scores, nan=(finite.max() + 1.0) if finite.size else 1.0)
    normal_scores = scores[~labels]
    has_t = threshold is not None and np.isfinite(threshold)
    rows = []
    for name in sorted(set(types), key=lambda t: (bool(labels[types == t].any()), t)):
        sel = types == name
        anomalous = bool(labels[sel].any())
        s = scores[sel]
        auroc = None
        if anomalous and len(normal_scores):
            y = np.r_[np.zeros(len(normal_scores)), np.ones(len(s))]
            auroc = float(roc_auc_score(y, np.r_[normal_scores, s]))
        rows.append({"defect_type": str(name), "label": "anomalous" if anomalous else "normal",
                     "n_images": int(sel.sum()), "median_score": float(np.median(s)),
                     "flagged": float((s > threshold).mean()) if has_t else None, "image_auroc": auroc})
    return rows


def defect_type_table(rows: list[dict]) -> str:
    cells = []
    for r in rows:
        flagged = "&ndash;" if r["flagged"] is None else f"{r['flagged']:.1%}"
        cells.append(f"<tr><td>{html.escape(r['defect_type'])}</td><td>{r['label']}</td>"
                     f"<td class='num'>{r['n_images']}</td><td class='num'>{_fmt(r['median_score'])}</td>"
                     f"<td class='num'>{flagged}</td><td class='num'>{_fmt(r['image_auroc'])}</td></tr>")
    return ("<table class='types'><tr><th>defect type</th><th>label</th><th>images</th><th>median score</th>"
            "<th>flagged at threshold</th><th>image AUROC vs normal</th></tr>" + "".join(cells) + "</table>"
            "<p class='note'>Flagged: the detection rate of a defect type; for normal images, the false-alarm "
            "rate.</p>")


def run_rows(run: dict, scored: Scored, types: list[str]) -> list[tuple[str, str]]:
    """(label, text) rows describing the run (``info.run_info``'s dict; ``test_data``, if there, is the
    evaluated set's {format, root, category, options}, ``data`` the training set's from run.json)."""
    labels = scored.labels.astype(bool)
    n_types = len({t for t, lab in zip(types, labels) if lab})
    rows = [("run", f"{run.get('run')} (written by fastflow {run.get('version')})")]
    def where(data: dict) -> str:
        options = f"; {data['options']}" if data.get("options") else ""
        return f"{data['format']} {os.path.abspath(data['root'])}, category {data['category']}{options}"

    tested, trained = run.get("test_data"), run.get("data")
    if tested:
        rows.append(("test data", where(tested)))
    if trained and (not tested or where(trained) != where(tested)):
        rows.append(("trained on", where(trained)))
    rows.append(("test set", f"{len(labels)} images: {int((~labels).sum())} normal, {int(labels.sum())} anomalous "
                             f"in {n_types} defect type(s)"))
    tr, m = run.get("training") or {}, run.get("model_config") or {}
    if tr.get("n_fit") is not None:
        rows.append(("training", f"{tr['n_fit']} normal images fitted, {tr.get('n_val')} held out (epoch selection "
                                 f"and threshold); kept {kept_epochs_text(tr.get('best_epoch'), tr.get('kept_epochs'))}"))
    size = "x".join(map(str, m.get("input_size") or [])) or "?"
    chosen = " (chosen by --backbone auto)" if run.get("auto") else ""
    rows.append(("model", f"preset {run.get('preset') or m.get('backbone')}{chosen}: backbone {m.get('backbone')}, "
                          f"input {size}, {m.get('flow_steps')} flow steps per level"))
    if run.get("map_choice"):  # TrainConfig.choose_map
        rows.append(("anomaly map", run["map_choice"]["why"]))
    if run.get("score_choice"):  # TrainConfig.choose_score
        rows.append(("image score", run["score_choice"]["why"]))
    rows.append(("threshold", _threshold_text(run.get("threshold") or {}, str(run.get("run")))))
    return rows


def _threshold_text(th: dict, run_dir: str) -> str:
    value = th.get("value")
    if value is None or not np.isfinite(value):
        return "none (no held-out images): set one with fastflow calibrate RUN_DIR --normal-dir DIR"
    how = th.get("calibrated_on") or "held-out normal training images"
    text = (f"{value:.4f}, calibrated at a false-alarm rate of {th.get('false_alarm_rate')} on {th.get('n_val')} "
            f"normal images ({how}), never on this test set")
    if th.get("val_median") is not None:
        text += f"; their median score {th['val_median']:.4f}"
    return text + (f". Warning: {th['warning'].replace('RUN_DIR', run_dir)}" if th.get("warning") else "")


def run_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table class='run'>{body}</table>"


def _fmt(value) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, float) and not np.isfinite(value):
        return "NaN"
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def metrics_table(metrics: dict) -> str:
    columns = [("aligned test set", metrics)]
    if isinstance(metrics.get("misaligned"), dict):
        columns.append(("non-aligned (paper Section 8)", metrics["misaligned"]))
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in columns)
    rows = "".join(f"<tr><td>{label}</td>" + "".join(f"<td class='num'>{_fmt(m.get(key))}</td>" for _, m in columns)
                   + f"<td><code>{key}</code></td></tr>" for key, label in METRIC_ROWS
                   if any(key in m for _, m in columns))
    return f"<table class='metrics'><tr><th>metric</th>{head}<th>JSON key</th></tr>{rows}</table>"


CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:4px 10px;text-align:left;vertical-align:top}
table.metrics td,table.metrics th{border-bottom:1px solid #eee}
td.num{text-align:right;font-variant-numeric:tabular-nums}
table.gallery img{display:block;max-width:256px;height:auto}.cap{max-width:260px;font-size:13px;word-break:break-all}
table.types td,table.types th,table.run td,table.run th{border-bottom:1px solid #eee}.warn{color:#a40}
.dir{color:#888;font-size:11px}.note{color:#555}img.plot{max-width:100%}"""


def write_report(path: str, scored: Scored, metrics: dict, dataset, mean, std, threshold: float | None = None,
                 title: str = "FastFlow evaluation", run: dict | None = None,
                 defect_types: list[str] | None = None) -> str:
    """Write the HTML report to ``path``; returns it.

    scored: the results of ``score_dataset`` on ``dataset`` (same order); dataset: indexable, item ``i`` a
    dict with ``image`` (3, H, W) normalised by ``mean``/``std`` (only the gallery images are read).
    metrics: as ``metrics_for`` (optionally with ``misaligned``). run: ``info.run_info(RUN_DIR)`` for the
    run section (left out when None). defect_types: each test image's (``Sample.defect_type``; default:
    the images' folder names).
    """
    types = defect_types if defect_types is not None else defect_types_from_paths(scored.paths)
    finite = scored.maps[np.isfinite(scored.maps)]
    vmin, vmax = (np.percentile(finite, [1, 99.9]) if finite.size else (0.0, 1.0))
    chosen = select_galleries(scored, threshold)
    galleries = "".join(_gallery_html(t, note, idx, scored, dataset, mean, std, float(vmin), float(vmax), threshold)
                        for t, note, idx in chosen)
    rows, type_rows = (run_rows(run, scored, types) if run else []), per_defect_type(scored, types, threshold)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="fastflow-page-height" content="{_page_height(scored, chosen, len(rows), len(type_rows))}">
<style>{CSS}</style></head>
<body><h1>{html.escape(title)}</h1>
<p class="note">{len(scored.scores)} test images &middot; written {stamp}. The threshold was calibrated on
held-out normal training images, never on this test set; F1-max uses the best threshold on this set (an
optimistic figure).</p>
{f"<h2>Run</h2>{run_table(rows)}" if rows else ""}
<h2>Metrics</h2>{metrics_table(metrics)}
<h2>Per defect type</h2>{defect_type_table(type_rows)}
<h2>Curves</h2><img class="plot" src="{curves_png(scored, metrics)}" alt="ROC and PRO curves">
<h2>Image scores</h2><img class="plot" src="{histogram_png(scored, threshold)}" alt="score histograms">
<p class="note">Heatmaps below share one colour scale: {vmin:.4g} (blue) to {vmax:.4g} (red), the 1st and
99.9th percentiles of all anomaly-map values; the heatmap is transparent at the bottom of the scale and
{HEAT_MAX_ALPHA:.0%} opaque at its top, so the part shows through.</p>
{galleries}
</body></html>
"""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def _page_height(scored: Scored, galleries, n_run_rows: int, n_type_rows: int) -> int:
    """About how tall the page is, in CSS pixels at 1280 px wide (for docs/render_report.sh): the headings
    and tables, the two plots (their size at dpi 80) and every gallery row (a thumbnail's height)."""
    thumb_h = _thumb_size(*scored.maps.shape[1:])[0] if len(scored.maps) else THUMB
    tables = 32 * (n_run_rows + len(METRIC_ROWS) + 2 + n_type_rows) + 60
    plots = 4.2 * 80 + 3.6 * 80
    rows = sum(max(len(idx), 1) * (thumb_h + 10) + 120 for _, _, idx in galleries)
    return int(400 + tables + plots + 100 + rows + 200)
