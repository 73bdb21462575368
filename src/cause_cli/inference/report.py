"""Pages to look at: ``RUN/report.html`` (written by ``cause eval`` and ``cause report``) and
``OUT/index.html`` (written by ``cause segment``).

Each page is one self-contained HTML file that opens offline from the file system: its style
inline, no script, no font or picture from the network; its pictures are the files beside it,
linked by relative paths. A segment folder's gallery is paged (``index.html``,
``index-2.html``, ...), read from the manifest, so a million outputs make many small pages,
not one large one.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..runs import CURVES_FILE, METRICS_FILE, REPORT_FILE, RunDirectory
from .figures import palette
from .manifest import OutputFolder

GALLERY_PAGE_SIZE = 100  # inputs a gallery page shows
STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
.bar { background: #4c78a8; height: 12px; display: inline-block; } .bar.crf { background: #f58518; }
.swatch { display: inline-block; width: 14px; height: 14px; vertical-align: middle; margin-right: 4px;
  border: 1px solid #888; }
.legend span.item { display: inline-block; margin: 2px 12px 2px 0; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; } figure .pair { display: flex; gap: 4px; }
figure img { width: 200px; height: auto; display: block; }
figcaption { font-size: 12px; word-break: break-all; }
img.wide { max-width: 100%; }
nav a { margin-right: 12px; }
"""


def _page(title: str, body: Iterable[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _legend(names: list[str]) -> str:
    colours = palette()
    items = []
    for index, name in enumerate(names):
        red, green, blue = (int(value) for value in colours[index % len(colours)])
        items.append(
            f'<span class="item"><span class="swatch" style="background: rgb({red}, {green}, {blue})"></span>'
            f"{index}: {html.escape(name)}</span>"
        )
    return '<div class="legend">' + "".join(items) + "</div>"


def _figure_row(name: str, scores: dict[str, Any] | None) -> str:
    if not scores:
        return ""
    return (
        f'<tr><td>{html.escape(name)}</td><td class="number">{scores["miou"]:.1f}</td>'
        f'<td class="number">{scores["pixel_accuracy"]:.1f}</td></tr>'
    )


def _iou_bars(metrics: dict[str, Any]) -> str:
    plain = metrics.get("iou_per_class") or {}
    refined = (metrics.get("crf") or {}).get("iou_per_class") or {}
    rows = ["<table><tr><th>class</th><th>IoU</th><th></th></tr>"]
    for name, value in plain.items():
        cells = []
        for label, number in (("", value), (" crf", refined.get(name))):
            if number is None:
                continue
            cells.append(f'<span class="bar{label}" style="width: {2.5 * number:.1f}px"></span> {number:.1f}')
        rows.append(f"<tr><td>{html.escape(str(name))}</td><td>{'<br>'.join(cells)}</td></tr>")
    rows.append("</table>")
    if refined:
        rows.append('<p><span class="bar"></span> clusters &nbsp; <span class="bar crf"></span> with the CRF</p>')
    return "\n".join(rows)


def _picture(run: RunDirectory, name: str, alt: str) -> str:
    if not run.has(name):
        return f"<p>({html.escape(name)} is not in the run folder.)</p>"
    return f'<img class="wide" src="{html.escape(name)}" alt="{html.escape(alt)}">'


def report_html(run: RunDirectory) -> str:
    """The run's report page, from run.json, metrics.json and the pictures beside them."""
    info = run.read_run_info()
    metrics = json.loads(run.file(METRICS_FILE).read_text(encoding="utf-8"))
    config = info.get("config", {})
    names = list(metrics.get("class_names") or [])
    baselines = metrics.get("baselines") or {}
    title = f"cause run {run.path.name}"
    crf_backend = metrics.get("crf_backend")
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Backbone <b>{html.escape(str(config.get('backbone')))}</b>, head "
        f"<b>{html.escape(str(config.get('head')))}</b>, {metrics.get('num_classes')} clusters; evaluated on "
        f"{metrics.get('images')} images of the {html.escape(str(metrics.get('split')))} split of "
        f"{html.escape(str(metrics.get('dataset')))} ({html.escape(str(metrics.get('data_dir')))}) at "
        f"{html.escape(str(metrics.get('evaluated_at')))}.</p>",
        "<h2>Figures</h2>",
        "<table><tr><th></th><th>mIoU</th><th>pixel accuracy</th></tr>",
        _figure_row("clusters (Hungarian matching)", metrics),
        _figure_row(f"clusters + CRF ({crf_backend})", metrics.get("crf")),
        _figure_row("linear probe", metrics.get("linear_probe")),
        _figure_row("k-means on the backbone's tokens", baselines.get("kmeans_tokens")),
        _figure_row("k-means on the head's features", baselines.get("kmeans_head")),
        "</table>",
        f"<p>{html.escape(str(metrics.get('protocol', '')))}</p>",
        "<h2>IoU per class</h2>",
        _iou_bars(metrics),
        "<h2>Validation images</h2>",
        "<p>Each row: the image, its ground truth, the prediction"
        + (" and the CRF's" if metrics.get("crf") else "")
        + ".</p>",
        _legend(names),
        _picture(run, "samples.png", "validation images, ground truth and predictions"),
        "<h2>Confusion matrix</h2>",
        _picture(run, "confusion.png", "confusion matrix"),
        "<h2>Training curves</h2>",
        _picture(run, CURVES_FILE, "training curves"),
        "<h2>Settings</h2>",
        "<table>"
        + "".join(
            f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(json.dumps(value))}</td></tr>"
            for key, value in sorted(config.items())
        )
        + "</table>",
    ]
    return _page(title, body)


def write_report(run: RunDirectory) -> Path:
    """Write ``RUN/report.html`` (recorded as the run's own); its path."""
    text = report_html(run)
    run.write_file(REPORT_FILE, lambda target: target.write_text(text, encoding="utf-8"))
    return run.file(REPORT_FILE)


def gallery_page_name(page: int) -> str:
    return "index.html" if page == 1 else f"index-{page}.html"


def gallery_pages(
    entries: Iterator[dict[str, Any]], written: int, names: list[str], image_root: str | None = None
) -> Iterator[tuple[str, str]]:
    """``(file name, html)`` of each gallery page of a segment folder's finished ``entries``
    (``written`` of them not skipped; read as they stream by, a page at a time): each input's
    overlay (or label map) linked to its files, and the input itself where ``image_root`` (the
    inputs' folder, relative to the output folder) says where it is."""
    pages = max(1, -(-written // GALLERY_PAGE_SIZE))
    shown = (entry for entry in entries if "skipped" not in entry)
    for page in range(1, pages + 1):
        chunk = [entry for _, entry in zip(range(GALLERY_PAGE_SIZE), shown, strict=False)]
        navigation = ["<nav>"]
        if page > 1:
            navigation.append(f'<a href="{gallery_page_name(page - 1)}">previous</a>')
        navigation.append(f"page {page} of {pages} ({written:,} images)")
        if page < pages:
            navigation.append(f'<a href="{gallery_page_name(page + 1)}">next</a>')
        navigation.append("</nav>")
        figures = ['<div class="grid">'] + [_gallery_figure(entry, image_root) for entry in chunk] + ["</div>"]
        body = ["<h1>cause segment</h1>", *navigation, _legend(names), *figures, *navigation]
        yield gallery_page_name(page), _page(f"cause segment, page {page} of {pages}", body)


def _gallery_figure(entry: dict[str, Any], image_root: str | None) -> str:
    links = " ".join(
        f'<a href="{html.escape(_url(entry[key]))}">{key}</a>' for key in ("label", "overlay", "scores") if key in entry
    )
    pictures = []
    if image_root is not None:
        source = html.escape(_url(f"{image_root}/{entry['input']}"))
        pictures.append(f'<a href="{source}"><img src="{source}" loading="lazy" alt="input"></a>')
    picture = entry.get("overlay") or entry.get("label")
    if picture:
        address = html.escape(_url(picture))
        pictures.append(
            f'<a href="{address}"><img src="{address}" loading="lazy" alt="{html.escape(entry["input"])}"></a>'
        )
    caption = f"<figcaption>{html.escape(entry['input'])} · {links}</figcaption>"
    return f'<figure><div class="pair">{"".join(pictures)}</div>{caption}</figure>'


def write_gallery(folder: OutputFolder, written: int, names: list[str], image_root: str | None) -> None:
    """Write a segment folder's gallery pages from its manifests (``written`` inputs not
    skipped), every page in one record of the folder's ledger."""
    entries = (entry for part in folder.parts() for entry in folder.finished(part))
    with folder.owned.batch() as files:
        for name, text in gallery_pages(entries, written, names, image_root):
            files.write(name, partial(_write_text, text))


def _write_text(text: str, target: Path) -> None:
    target.write_text(text, encoding="utf-8")


def _url(path: str) -> str:
    """A relative path as a URL path (each part quoted; separators kept)."""
    return quote(path.replace(os.sep, "/"))
