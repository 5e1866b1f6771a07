#!/usr/bin/env python3
"""Draws a `loadgen --slow A,B,... --json` sweep as a self-contained SVG.

    python3 benches/plot_sweep.py benches/results/hub-sweep.json benches/results/hub-sweep.svg

The input is the JSON object `loadgen --json` prints as its last line (or a
file whose last non-empty line is that object). Two panels, one line per
variant, stalled clients on a log x axis (0 is drawn one decade left of the
smallest non-zero count, after a break):

- left: the server's CPU seconds per million events delivered to fast clients;
- right: the server's peak RSS (MiB, log axis).

A hollow marker is a point where fast clients lost events in the measured
window (`fast_dropped` or `fast_gaps` above 0). Python 3 standard library only.
"""

import json
import math
import sys
from html import escape

WIDTH, HEIGHT = 960, 420
PANEL_W, PANEL_H = 380, 280
MARGIN_L, MARGIN_T = 70, 70
GAP = 100
COLORS = {
    "hub": "#1b9e77",
    "broadcast": "#d95f02",
    "layer": "#7570b3",
    "hub-no-slow": "#66c2a5",
    "broadcast-no-slow": "#fc8d62",
    "layer-no-slow": "#8da0cb",
    "mpsc-bounded": "#e7298a",
    "mpsc-unbounded": "#a6761d",
}
FALLBACK = ["#66a61e", "#e6ab02", "#666666"]


def load(path):
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        last = [line for line in text.splitlines() if line.strip()][-1]
        return json.loads(last)


def series(data):
    """{name: [(slow, row), ...]} sorted by slow; -no-slow rows count as slow 0."""
    out = {}
    for row in data["variants"]:
        name = row["name"]
        slow = row.get("slow", 0)
        out.setdefault(name, []).append((slow, row))
    for rows in out.values():
        rows.sort(key=lambda r: r[0])
    return out


def nice_ticks(lo, hi, n=5):
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=10 * mag)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


def fmt_count(n):
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000:,}k" if n < 1_000_000 else f"{n / 1e6:g}M"
    return f"{n:,}"


def panel(x0, y0, title, ylabel, points, xs, log_y):
    """points: {name: [(slow, value, lost)]}. Returns SVG elements."""
    out = []
    nonzero = sorted(x for x in xs if x > 0)
    lo_dec = math.floor(math.log10(nonzero[0])) if nonzero else 0
    hi_dec = math.ceil(math.log10(nonzero[-1])) if nonzero else 1
    zero_dec = lo_dec - 1  # where 0 is drawn
    has_zero = any(x == 0 for x in xs)
    x_lo = zero_dec if has_zero else lo_dec
    x_hi = max(hi_dec, x_lo + 1)

    def px(slow):
        d = zero_dec if slow == 0 else math.log10(slow)
        return x0 + 10 + (PANEL_W - 20) * (d - x_lo) / (x_hi - x_lo)

    values = [v for pts in points.values() for (_, v, _) in pts if v is not None and v > 0]
    if not values:
        values = [1.0]
    if log_y:
        y_lo = 10 ** math.floor(math.log10(min(values)))
        y_hi = 10 ** math.ceil(math.log10(max(values)))
        if y_hi <= y_lo:
            y_hi = y_lo * 10
        ticks = []
        d = math.log10(y_lo)
        while d <= math.log10(y_hi) + 1e-9:
            for m in (1, 2, 5):
                t = m * 10**d
                if y_lo <= t <= y_hi:
                    ticks.append(t)
            d += 1

        def py(v):
            return y0 + PANEL_H - PANEL_H * (math.log10(v) - math.log10(y_lo)) / (
                math.log10(y_hi) - math.log10(y_lo)
            )
    else:
        ticks = nice_ticks(0, max(values) * 1.05)
        y_lo, y_hi = 0, ticks[-1]

        def py(v):
            return y0 + PANEL_H - PANEL_H * (v - y_lo) / (y_hi - y_lo)

    out.append(
        f'<rect x="{x0}" y="{y0}" width="{PANEL_W}" height="{PANEL_H}" '
        'fill="none" stroke="#999" stroke-width="1"/>'
    )
    out.append(
        f'<text x="{x0 + PANEL_W / 2}" y="{y0 - 12}" text-anchor="middle" '
        f'font-size="14" font-weight="bold">{escape(title)}</text>'
    )
    for t in ticks:
        y = py(t)
        out.append(
            f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + PANEL_W}" y2="{y:.1f}" '
            'stroke="#eee" stroke-width="1"/>'
        )
        out.append(
            f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{t:g}</text>'
        )
    for slow in sorted(set(xs)):
        x = px(slow)
        out.append(
            f'<line x1="{x:.1f}" y1="{y0 + PANEL_H}" x2="{x:.1f}" y2="{y0 + PANEL_H + 5}" '
            'stroke="#333"/>'
        )
        out.append(
            f'<text x="{x:.1f}" y="{y0 + PANEL_H + 18}" text-anchor="middle" '
            f'font-size="11">{fmt_count(slow)}</text>'
        )
    if has_zero and nonzero:
        # The break between 0 and the first decade.
        xb = (px(0) + px(nonzero[0])) / 2
        yb = y0 + PANEL_H
        out.append(
            f'<path d="M{xb - 6:.1f},{yb + 4} L{xb - 2:.1f},{yb - 4} M{xb + 2:.1f},{yb + 4} '
            f'L{xb + 6:.1f},{yb - 4}" stroke="#333" fill="none"/>'
        )
    out.append(
        f'<text x="{x0 + PANEL_W / 2}" y="{y0 + PANEL_H + 38}" text-anchor="middle" '
        'font-size="12">stalled clients (log scale)</text>'
    )
    out.append(
        f'<text transform="translate({x0 - 48},{y0 + PANEL_H / 2}) rotate(-90)" '
        f'text-anchor="middle" font-size="12">{escape(ylabel)}</text>'
    )
    for name, pts in points.items():
        color = COLORS.get(name)
        pts = [(s, v, lost) for (s, v, lost) in pts if v is not None and (v > 0 or not log_y)]
        if not pts:
            continue
        path = " ".join(
            f"{'M' if i == 0 else 'L'}{px(s):.1f},{py(v):.1f}" for i, (s, v, _) in enumerate(pts)
        )
        out.append(f'<path d="{path}" stroke="{color}" stroke-width="2" fill="none"/>')
        for s, v, lost in pts:
            fill = "white" if lost else color
            out.append(
                f'<circle cx="{px(s):.1f}" cy="{py(v):.1f}" r="4" fill="{fill}" '
                f'stroke="{color}" stroke-width="2"><title>{escape(name)}, {s:,} stalled: '
                f'{v:.3g}{" (fast clients lost events)" if lost else ""}</title></circle>'
            )
    return out


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    data = load(argv[1])
    by_name = series(data)
    names = list(by_name)
    fallback = iter(FALLBACK)
    for name in names:
        if name not in COLORS:
            COLORS[name] = next(fallback, "#000000")
    xs = sorted({slow for rows in by_name.values() for slow, _ in rows})

    def lost(row):
        return (row.get("fast_dropped") or 0) + (row.get("fast_gaps") or 0) > 0

    cpu = {
        n: [(s, r.get("cpu_s_per_million"), lost(r)) for s, r in rows]
        for n, rows in by_name.items()
    }
    rss = {
        n: [(s, (r.get("peak_rss_bytes") or 0) / 1048576, lost(r)) for s, r in rows]
        for n, rows in by_name.items()
    }
    setup = data.get("setup", {})
    subtitle = ", ".join(
        part
        for part in [
            f"{setup['rate']:,} events/s x {setup['size']} B" if "rate" in setup else None,
            f"{setup['fast']} fast clients" if "fast" in setup else None,
            f"{setup['seconds']} s measured" if "seconds" in setup else None,
            f"median of {setup['runs']} runs" if "runs" in setup else None,
            f"load avg at start {setup['load_1m_start']}" if setup.get("load_1m_start") else None,
        ]
        if part
    )
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="16" font-weight="bold">'
        "SSE fan-out: what stalled clients cost the server</text>",
        f'<text x="{WIDTH / 2}" y="40" text-anchor="middle" font-size="12" fill="#555">'
        f"{escape(subtitle)}</text>",
    ]
    svg += panel(
        MARGIN_L, MARGIN_T, "CPU per delivered event", "server CPU s per million events", cpu, xs, False
    )
    svg += panel(
        MARGIN_L + PANEL_W + GAP, MARGIN_T, "Peak RSS", "server peak RSS, MiB (log)", rss, xs, True
    )
    # Legend.
    lx, ly = MARGIN_L, HEIGHT - 16
    for name in names:
        svg.append(
            f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 20}" y2="{ly - 4}" '
            f'stroke="{COLORS[name]}" stroke-width="2"/>'
        )
        svg.append(f'<circle cx="{lx + 10}" cy="{ly - 4}" r="4" fill="{COLORS[name]}"/>')
        svg.append(f'<text x="{lx + 26}" y="{ly}" font-size="12">{escape(name)}</text>')
        lx += 40 + 8 * len(name)
    svg.append(f'<circle cx="{lx + 10}" cy="{ly - 4}" r="4" fill="white" stroke="#333" stroke-width="2"/>')
    svg.append(f'<text x="{lx + 20}" y="{ly}" font-size="12">fast clients lost events</text>')
    svg.append("</svg>")
    with open(argv[2], "w", encoding="utf-8") as f:
        f.write("\n".join(svg) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
