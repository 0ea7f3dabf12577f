"""A hand-written SVG bar chart of failover outages (no plotting dependency).

Owns: turning rows of (fault, daemon, median, max, two-holder samples) into one small SVG:
per fault a bar per daemon for the median outage, a whisker to the max, and a red mark
where any run had two VIP holders.

Must never: measure anything; it draws what it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

COLORS = {"vipd": "#2b6cb0", "keepalived": "#b7791f"}


@dataclass
class Bar:
    fault: str
    daemon: str
    median: float  # seconds
    worst: float
    two_holder_samples: int


def _label(b: Bar) -> str:
    label = f"{b.daemon} {b.median * 1000:.0f} ms (max {b.worst * 1000:.0f})"
    if b.two_holder_samples:
        label += f" — TWO HOLDERS in {b.two_holder_samples} samples"
    return label


def render(bars: list[Bar], title: str) -> str:
    faults = list(dict.fromkeys(b.fault for b in bars))
    daemons = list(dict.fromkeys(b.daemon for b in bars))
    finite = [x for b in bars for x in (b.median, b.worst) if x != float("inf")]
    top = max([1.0, *finite]) * 1.1
    left, row_h, bar_h, plot = 120, 26 * max(1, len(daemons)) + 16, 20, 420
    footer = "bars: median client-visible outage (20 ms TCP probe through the VIP); whisker: max"
    labels = [_label(b) for b in bars]
    # Room to the right of the longest whisker for its label (~7 px a character at 12 px).
    width = max(left + plot + 7 * max([0, *map(len, labels)]) + 16, left + 7 * len(footer) + 16)
    height = 60 + row_h * len(faults) + 40
    scale = plot / top
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>']
    y0 = 40
    for i, fault in enumerate(faults):
        y = y0 + i * row_h
        out.append(f'<text x="{left - 8}" y="{y + row_h / 2}" text-anchor="end">{escape(fault)}</text>')
        for j, daemon in enumerate(daemons):
            b = next((x for x in bars if x.fault == fault and x.daemon == daemon), None)
            if b is None:
                continue
            by = y + 4 + j * (bar_h + 6)
            w = min(b.median, top) * scale
            out.append(f'<rect x="{left}" y="{by}" width="{w:.1f}" height="{bar_h}" '
                       f'fill="{COLORS.get(daemon, "#666")}"><title>{escape(daemon)} median '
                       f'{b.median:.3f}s, max {b.worst:.3f}s</title></rect>')
            wx = left + min(b.worst, top) * scale
            out.append(f'<line x1="{left + w:.1f}" y1="{by + bar_h / 2}" x2="{wx:.1f}" y2="{by + bar_h / 2}" '
                       f'stroke="#333"/><line x1="{wx:.1f}" y1="{by + 4}" x2="{wx:.1f}" y2="{by + bar_h - 4}" stroke="#333"/>')
            label = _label(b)
            color = "#c53030" if b.two_holder_samples else "#222"
            out.append(f'<text x="{wx + 6:.1f}" y="{by + bar_h - 6}" fill="{color}">{escape(label)}</text>')
    axis_y = y0 + row_h * len(faults) + 4
    out.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot}" y2="{axis_y}" stroke="#999"/>')
    step = 0.5 if top <= 4 else 1.0 if top <= 10 else 5.0
    t = 0.0
    while t <= top:
        x = left + t * scale
        out.append(f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 4}" stroke="#999"/>'
                   f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">{t:g}s</text>')
        t += step
    out.append(f'<text x="{left}" y="{height - 6}" fill="#555">{escape(footer)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
