"""
A training stage's curves (loss, validation bits per byte or loss, RL reward) as a small PNG, from its
progress history, for the run's Prefect artifacts and report card; `render_panels` also draws the trend of a
lineage's key metrics (flows/trend.py).

The history is `progress.jsonl` in the stage's artifact directory: one JSON object per progress line, e.g.
{"step": 10, "total": 40, "loss": 3.2}, appended across attempts. An artifact made before that file existed
still has its `stage.log`, whose progress lines are the same objects. A resumed stage repeats the steps
after its last checkpoint: for each curve the last value reported for a step wins.

matplotlib is imported inside `render_panels` only (Agg canvas, no display, no global backend switch): the
flow process pays for it once, when a run ends. The trend changes with every run (this run is its last
point), so no kept drawing could serve a cached re-run: it is drawn with Pillow alone (~0.03 s to import,
where matplotlib costs a cached re-run ~1.3 s).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import time
from pathlib import Path

from nanopipe.common import atomic_write_bytes
from nanopipe.events import parse_progress

PROGRESS_FILE = "progress.jsonl"
LOG_FILE = "stage.log"
# (curve, axis title): what the training stages report on their progress lines, one panel each
CURVES = {"loss": "train loss", "val_loss": "validation loss", "val_bpb": "validation bits per byte",
          "reward": "mean reward", "pass_at_1": "pass@1"}
WIDTH_PX, HEIGHT_PX, DPI = 640, 360, 80
# Lines on white need few colours: a 64-colour palette makes the PNG ~3x smaller than matplotlib's RGBA one, and
# every run stores its drawings in Prefect's database (base64, in the report card and the curve artifacts)
PALETTE_COLORS = 64
# A kept drawing nobody has shown for this long is deleted the next time a new drawing is kept (~10 kB each)
CACHE_KEEP_DAYS = 30


def read_progress(artifact_dir: str | Path) -> list[dict]:
    """The stage's progress objects in the order written: progress.jsonl, else the progress lines of
    stage.log; [] when neither exists. A line that does not parse (a write cut by a kill) is skipped."""
    directory = Path(artifact_dir)
    jsonl, log = directory / PROGRESS_FILE, directory / LOG_FILE
    if jsonl.is_file():
        records = []
        for line in jsonl.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return [r for r in records if isinstance(r, dict)]
    if log.is_file():
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        return [p for p in map(parse_progress, lines) if isinstance(p, dict)]
    return []


def curve_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{curve: [(step, value)] sorted by step}, the last value written for a step winning (a resumed
    attempt repeats steps), in CURVES order. Only curves with two points or more: one draws no curve."""
    series: dict[str, dict[int, float]] = {}
    for record in records:
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        for name in CURVES:
            value = record.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                series.setdefault(name, {})[step] = float(value)
    return {name: sorted(series[name].items()) for name in CURVES if len(series.get(name, {})) >= 2}


def render_curves(series: dict[str, list[tuple[int, float]]], title: str) -> bytes:
    """One panel per curve, side by side, as a 640x360 palette PNG (~10 kB)."""
    assert series, f"{title}: no curve to draw"
    return render_panels({CURVES[name]: points for name, points in series.items()}, title, "step")


def render_panels(panels: dict[str, list[tuple[float, float]]], title: str, xlabel: str,
                  per_row: int | None = None) -> bytes:
    """One small line plot per panel ({panel title: [(x, y)]}), `per_row` to a row (all in one row when
    None), as a palette PNG 640 px wide and 360 px high per row of panels at most."""
    assert panels, f"{title}: no panel to draw"
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(per_row or len(panels), len(panels))
    nrows = math.ceil(len(panels) / ncols)
    height_px = HEIGHT_PX if nrows == 1 else 40 + 200 * nrows
    figure = Figure(figsize=(WIDTH_PX / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=False).flatten()
    for ax, (name, points) in zip(axes, panels.items()):
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs, ys, marker="." if len(points) <= 30 else None, linewidth=1.2)
        ax.set_title(name, fontsize=10 if nrows == 1 else 9)
        ax.set_xlabel(xlabel, fontsize=9 if nrows == 1 else 8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:   # the empty places of the last row
        ax.set_axis_off()
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=DPI)
    return palette_png(out.getvalue())


def render_small_multiples(panels: dict[str, list[tuple[int, float]]], title: str, per_row: int = 4) -> bytes:
    """One small line plot per panel ({title: [(x, y)]}, x from 1), `per_row` to a row, each with its
    lowest and highest value written on its left and its last point (this run) marked, as a palette PNG
    640 px wide. Pillow only (see the module docstring)."""
    assert panels, f"{title}: no panel to draw"
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=11)
    except (TypeError, OSError):   # an old Pillow or one without FreeType: its bitmap font
        font = ImageFont.load_default()
    ncols = min(per_row, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    panel_w, panel_h, top = WIDTH_PX // ncols, 150, 26
    image = Image.new("RGB", (WIDTH_PX, top + panel_h * nrows), "white")
    draw = ImageDraw.Draw(image)
    draw.text((WIDTH_PX // 2, 6), title, fill="black", font=font, anchor="mt")
    last_x = max((x for points in panels.values() for x, _ in points), default=1)
    for i, (name, points) in enumerate(panels.items()):
        x0, y0 = (i % ncols) * panel_w, top + (i // ncols) * panel_h
        left, right, upper, lower = x0 + 44, x0 + panel_w - 8, y0 + 18, y0 + panel_h - 18
        draw.text(((left + right) // 2, y0 + 2), name, fill="black", font=font, anchor="mt")
        draw.rectangle((left, upper, right, lower), outline=(190, 190, 190))
        draw.text((left, lower + 3), "1", fill="gray", font=font, anchor="mt")
        draw.text((right, lower + 3), str(last_x), fill="gray", font=font, anchor="rt")
        if not points:
            continue
        low, high = min(y for _, y in points), max(y for _, y in points)
        ticks = ((high, upper), (low, lower)) if high > low else ((high, (upper + lower) / 2),)
        for value, y in ticks:
            label = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
            draw.text((left - 3, y), label, fill="gray", font=font, anchor="rm")
        xy = [(left + (right - left) * (x - 1) / max(last_x - 1, 1),
               lower - (lower - upper) * ((y - low) / (high - low) if high > low else 0.5)) for x, y in points]
        if len(xy) > 1:
            draw.line(xy, fill=(31, 119, 180), width=2)
        for px, py in xy:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=(31, 119, 180))
        px, py = xy[-1]
        draw.ellipse((px - 4, py - 4, px + 4, py + 4), outline=(214, 39, 40), width=2)
    out = io.BytesIO()
    image.quantize(colors=PALETTE_COLORS).save(out, format="PNG", optimize=True)
    return out.getvalue()


def palette_png(png: bytes, colors: int = PALETTE_COLORS) -> bytes:
    """The same picture as a PNG of at most `colors` colours (Pillow, which matplotlib itself uses)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        reduced = image.convert("RGB").quantize(colors=colors)
    out = io.BytesIO()
    reduced.save(out, format="PNG", optimize=True)
    return out.getvalue()


def stage_curves(artifact_dir: str | Path, title: str, cache_dir: str | Path | None = None) -> bytes | None:
    """The stage's curves as PNG bytes, or None when its history has no curve (e.g. a tokenizer stage).

    With `cache_dir`, a drawing is kept there under the hash of what it shows (title, points, size), so
    a re-run whose stages were all cached neither imports matplotlib nor draws again (~1.3 s saved).
    Showing a kept drawing renews it; keeping a new one deletes those not shown for CACHE_KEEP_DAYS."""
    series = curve_series(read_progress(artifact_dir))
    if not series:
        return None
    if cache_dir is None:
        return render_curves(series, title)
    key = json.dumps([title, series, WIDTH_PX, HEIGHT_PX, DPI, PALETTE_COLORS], separators=(",", ":"))
    cached = Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.png"
    try:
        png = cached.read_bytes()
        os.utime(cached)   # shown again: kept for another CACHE_KEEP_DAYS
        return png
    except OSError:
        pass
    png = render_curves(series, title)
    try:
        atomic_write_bytes(cached, png)   # a reader never sees half a file
        prune_cache(Path(cache_dir), keep=cached)
    except OSError:
        pass   # a cache that cannot be written costs the next run a drawing, nothing else
    return png


def prune_cache(cache_dir: Path, keep: Path, max_age_days: float = CACHE_KEEP_DAYS) -> None:
    """Delete the kept drawings not shown for `max_age_days` (by modification time), except `keep`."""
    oldest = time.time() - max_age_days * 86400
    for path in cache_dir.glob("*.png"):
        try:
            if path != keep and path.stat().st_mtime < oldest:
                path.unlink()
        except OSError:   # another run deleted or renewed it meanwhile
            pass


def markdown_image(png: bytes, alt: str) -> str:
    """The PNG inline in markdown as a data URI: the Prefect UI renders it as <img> with no file server."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"
