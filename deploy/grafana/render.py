"""Draw the panels of the Grafana dashboard (gtsrb.json) from a Prometheus HTTP API into one PNG.

Grafana is not packaged here, so this is how README's picture of the dashboard is made: each
panel's PromQL expressions over a time range (``/api/v1/query_range``, Grafana's
``$__rate_interval`` and ``$__interval`` given values), drawn where the dashboard's grid puts
the panel, with its title, unit, legend and threshold lines. Pillow only.

    python deploy/grafana/render.py --prometheus http://127.0.0.1:9090 --minutes 10 \\
        -o deploy/grafana/dashboard.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
WIDTH, ROW = 1440, 30  # pixels: the canvas (Grafana's 24 columns) and one grid row
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
BACKGROUND, PANEL, GRID, TEXT, MUTED = "#ffffff", "#f7f8fa", "#d9dde3", "#1f2329", "#6b7280"


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    """[{"metric": labels, "values": [[t, "v"], ...]}, ...] of ``expr`` (a Prometheus error raises)."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus.rstrip('/')}/api/v1/query_range?{params}", timeout=30) as r:
        answer = json.load(r)
    if answer.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {expr!r}: {answer}")
    return answer["data"]["result"]


def with_grafana_variables(expr: str, rate_interval: str, step: float) -> str:
    return expr.replace("$__rate_interval", rate_interval).replace("$__interval", f"{max(1, round(step))}s")


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's legend format: {{label}} replaced by its value; none: every label."""
    if not template:
        return ", ".join(f"{k}={v}" for k, v in labels.items()) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()


def formatted(value: float, unit: str) -> str:
    if unit == "percentunit":
        return f"{100 * value:.0f}%"
    if unit == "s":
        return f"{1000 * value:.0f} ms" if value < 1 else f"{value:.2g} s"
    suffix = "/s" if unit == "reqps" else ""
    if abs(value) >= 1000:
        return f"{value / 1000:.1f}k{suffix}"
    return f"{value:.2g}{suffix}" if abs(value) < 10 else f"{value:.0f}{suffix}"


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's own TrueType font (FreeType builds)
    except TypeError:  # an old Pillow: its bitmap font
        return ImageFont.load_default()


def draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], panel: dict, series: list) -> None:
    """One panel: title, y axis with the unit, x axis times, lines, thresholds, legend."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, fill=PANEL, outline=GRID)
    draw.text((x0 + 8, y0 + 6), panel["title"], fill=TEXT, font=font(14))
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    unit = defaults.get("unit", "short")
    thresholds = [
        s["value"] for s in defaults.get("thresholds", {}).get("steps", []) if s.get("value") is not None
    ]
    entries = min(len(series), 6)
    legend_rows = math.ceil(entries / 2)
    px0, py0, px1, py1 = x0 + 62, y0 + 28, x1 - 10, y1 - 24 - 16 * legend_rows
    points = [(t, v) for _, values in series for t, v in values if math.isfinite(v)]
    if not points:
        draw.text((px0, (py0 + py1) // 2), "no data", fill=MUTED, font=font(12))
        return
    times = [t for t, _ in points]
    t_min, t_max = min(times), max(times)
    low = defaults.get("min", min(v for _, v in points))
    high = defaults.get("max", max([v for _, v in points] + [t * 1.1 for t in thresholds]))
    if high <= low:
        high = low + 1
    t_span = max(t_max - t_min, 1e-9)

    def at(t: float, v: float) -> tuple[float, float]:
        return px0 + (px1 - px0) * (t - t_min) / t_span, py1 - (py1 - py0) * (v - low) / (high - low)

    small = font(11)
    for i in range(5):  # horizontal grid lines and their values
        v = low + (high - low) * i / 4
        _, y = at(t_min, v)
        draw.line((px0, y, px1, y), fill=GRID)
        label = formatted(v, unit)
        draw.text((px0 - 6 - draw.textlength(label, font=small), y - 7), label, fill=MUTED, font=small)
    for t in (t_min, (t_min + t_max) / 2, t_max):
        x, _ = at(t, low)
        label = datetime.datetime.fromtimestamp(t).strftime("%H:%M:%S")
        width = draw.textlength(label, font=small)
        x = min(max(x - width / 2, px0 - 20), x1 - 6 - width)  # inside the panel
        draw.text((x, py1 + 4), label, fill=MUTED, font=small)
    for threshold in thresholds:
        _, y = at(t_min, threshold)
        for x in range(int(px0), int(px1), 10):
            draw.line((x, y, min(x + 5, px1), y), fill="#e02f44", width=2)
    for i, (name, values) in reversed(list(enumerate(series))):  # the first drawn last, on top
        color = COLORS[i % len(COLORS)]
        run: list[tuple[float, float]] = []
        for t, v in [*values, (None, math.nan)]:  # a NaN (or the end) breaks the line
            if t is not None and math.isfinite(v):
                run.append(at(t, min(max(v, low), high)))
                continue
            if len(run) > 1:
                draw.line(run, fill=color, width=2)
            elif run:
                draw.ellipse((run[0][0] - 2, run[0][1] - 2, run[0][0] + 2, run[0][1] + 2), fill=color)
            run = []
        if i < entries:
            lx = x0 + 12 + (i % 2) * (x1 - x0) // 2
            ly = py1 + 22 + 16 * (i // 2)
            draw.rectangle((lx, ly + 4, lx + 12, ly + 8), fill=color)
            draw.text((lx + 18, ly - 1), name[:48], fill=TEXT, font=small)


def render(
    dashboard: dict, prometheus: str, start: float, end: float, out: Path, rate_interval: str = "1m"
) -> list[str]:
    """Draw every panel of ``dashboard`` from ``start`` to ``end`` into ``out``; returns the
    titles of the panels that had data."""
    step = max(1.0, (end - start) / 240)
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    header = 44
    image = Image.new("RGB", (WIDTH, header + rows * ROW + 8), BACKGROUND)
    draw = ImageDraw.Draw(image)
    span = f"{datetime.datetime.fromtimestamp(start):%Y-%m-%d %H:%M:%S} to {datetime.datetime.fromtimestamp(end):%H:%M:%S}"
    draw.text((10, 10), f"{dashboard['title']}   ({span}, from Prometheus)", fill=TEXT, font=font(18))
    column = WIDTH / 24
    with_data = []
    for panel in panels:
        g = panel["gridPos"]
        box = (
            round(g["x"] * column) + 4,
            header + g["y"] * ROW + 4,
            round((g["x"] + g["w"]) * column) - 4,
            header + (g["y"] + g["h"]) * ROW - 4,
        )
        series = []
        for target in panel.get("targets", []):
            expr = with_grafana_variables(target["expr"], rate_interval, step)
            for result in query_range(prometheus, expr, start, end, step):
                values = [(float(t), float(v)) for t, v in result["values"]]
                series.append((legend(target.get("legendFormat", ""), result["metric"]), values))
        # the highest first: their colours and legend entries (topk over a range brings more
        # series than k, one top k per step)
        series.sort(key=lambda s: -max((v for _, v in s[1] if math.isfinite(v)), default=-math.inf))
        draw_panel(draw, box, panel, series)
        if any(math.isfinite(v) for _, values in series for _, v in values):
            with_data.append(panel["title"])
    # a palette keeps the picture small (lines and text on flat colours)
    image.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    return with_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090", help="its base URL")
    ap.add_argument("--dashboard", default=str(HERE / "gtsrb.json"))
    ap.add_argument("--minutes", type=float, default=15, help="the range: the last N minutes")
    ap.add_argument("--end", type=float, help="the range's end (Unix time; default: now)")
    ap.add_argument("--rate-interval", default="1m", help="what Grafana's $__rate_interval stands for")
    ap.add_argument("-o", "--out", default=str(HERE / "dashboard.png"))
    args = ap.parse_args()
    end = args.end or time.time()
    dashboard = json.loads(Path(args.dashboard).read_text())
    drawn = render(
        dashboard, args.prometheus, end - 60 * args.minutes, end, Path(args.out), args.rate_interval
    )
    print(f"{args.out}: {len(drawn)} of {len(dashboard['panels'])} panels with data")


if __name__ == "__main__":
    main()
