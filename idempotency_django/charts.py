"""Charts as inline SVG, drawn on the server: no JavaScript, no external library.

Every chart is an ``<svg role="img">`` labelled by its own ``<title>`` and ``<desc>``, with
axis labels, a legend, and a ``<title>`` on each bar and point (the browser shows it as a
tooltip). The SVG is built with :mod:`xml.etree.ElementTree`, which escapes every text and
attribute, so labels taken from stored records (an endpoint's path) cannot inject markup.
Colours are the Okabe-Ito palette, told apart with colour blindness; text and axes take the
page's text colour (``currentColor``), so the admin's dark theme applies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from xml.etree.ElementTree import Element, SubElement, tostring

from django.utils.formats import number_format
from django.utils.safestring import SafeString, mark_safe

SVG_NAMESPACE = "http://www.w3.org/2000/svg"
WIDTH = 640
HEIGHT = 270
# Room around the plot: the legend above, tick labels and axis titles on the other sides.
TOP, RIGHT, BOTTOM, LEFT = 36, 60, 56, 70
# The ranking chart: a row per entry, endpoint labels on the left.
ROW_HEIGHT, LABEL_WIDTH, VALUE_WIDTH, LABEL_CHARS = 24, 250, 150, 36

COLOURS = {
    "executions": "#56B4E9",
    "replays": "#E69F00",
    "conflicts": "#D55E00",
    "mismatches": "#CC79A7",
    "records": "#0072B2",
    "bytes": "#009E73",
    "rate": "#E69F00",
}


@dataclass(frozen=True)
class Series:
    """One set of bars: ``name`` for the legend, ``css`` names its class and colour."""

    name: str
    css: str
    values: Sequence[int]


@dataclass(frozen=True)
class Point:
    """A point of a line chart: ``at`` from 0 (left) to 1 (right), ``label`` its tooltip."""

    at: float
    value: float
    label: str


def integer(value: float) -> str:
    return number_format(round(value), force_grouping=True)


def percent(value: float, decimals: int = 1) -> str:
    return f"{number_format(value * 100, decimal_pos=decimals)}%"


def nice_ticks(highest: float, *, whole: bool = True, steps: int = 4) -> list[float]:
    """Ticks from 0 to a round top at or above ``highest``: about ``steps`` intervals of
    1, 2, 2.5 or 5 times a power of ten (whole numbers only with ``whole``)."""
    if highest <= 0:
        return [0.0, 1.0]
    rough = highest / steps
    power = 10 ** math.floor(math.log10(rough))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= rough)
    if whole:
        step = max(1.0, math.ceil(step))
    return [i * step for i in range(math.ceil(highest / step - 1e-9) + 1)]


def bar_chart(
    *,
    ident: str,
    title: str,
    description: str,
    slots: Sequence[str],
    ticks: Sequence[tuple[int, str]],
    series: Sequence[Series],
    x_label: str,
    y_label: str,
    rate: Sequence[float | None] | None = None,
    rate_label: str = "",
) -> SafeString:
    """Grouped bars, one group per slot (``slots``: each slot's tooltip label), every slot
    drawn even at zero; ``ticks``: (slot index, label) under the axis. ``rate``: a line of
    fractions (``None`` where undefined) on a 0-100 % axis at the right."""
    root = _svg(ident, title, description, HEIGHT)
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    values = [value for one in series for value in one.values]
    levels = nice_ticks(max(values, default=0))
    _y_axis(root, levels, integer, y_label)
    _legend(
        root, [(one.name, one.css) for one in series] + ([(rate_label, "rate")] if rate else [])
    )
    slot = plot_width / max(len(slots), 1)
    bar = slot * 0.8 / max(len(series), 1)
    for index, label in enumerate(slots):
        for number, one in enumerate(series):
            value = one.values[index]
            height = plot_height * value / levels[-1]
            rect = SubElement(
                root,
                "rect",
                {
                    "class": f"bar {one.css}",
                    "x": _n(LEFT + index * slot + slot * 0.1 + number * bar),
                    "y": _n(TOP + plot_height - height),
                    "width": _n(bar),
                    "height": _n(height),
                    "fill": COLOURS[one.css],
                },
            )
            SubElement(rect, "title").text = f"{label}: {integer(value)} {one.name}"
    _x_axis(root, [(LEFT + (i + 0.5) * slot, text) for i, text in ticks], x_label)
    if rate:
        _rate_line(root, rate, slots, slot, rate_label)
    return _render(root)


def line_chart(
    *,
    ident: str,
    title: str,
    description: str,
    points: Sequence[Point],
    ticks: Sequence[tuple[float, str]],
    x_label: str,
    y_label: str,
    css: str,
    name: str,
    format_value: Callable[[float], str] = integer,
    whole: bool = True,
    unit: str = "",
) -> SafeString:
    """A line through ``points``, a dot (with its tooltip) at each; ``ticks``: (0-1, label).
    ``unit`` follows the values in the tooltips (the axis label names it for the ticks)."""
    root = _svg(ident, title, description, HEIGHT)
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    levels = nice_ticks(max((p.value for p in points), default=0), whole=whole)
    _y_axis(root, levels, format_value, y_label)
    _legend(root, [(name, css)])
    _x_axis(root, [(LEFT + at * plot_width, text) for at, text in ticks], x_label)
    spots = [
        (LEFT + p.at * plot_width, TOP + plot_height * (1 - p.value / levels[-1]), p)
        for p in points
    ]
    if len(spots) > 1:
        SubElement(
            root,
            "polyline",
            {
                "class": f"line {css}",
                "points": " ".join(f"{_n(x)},{_n(y)}" for x, y, _ in spots),
                "fill": "none",
                "stroke": COLOURS[css],
                "stroke-width": "2",
            },
        )
    for x, y, point in spots:
        dot = SubElement(
            root,
            "circle",
            {"class": f"point {css}", "cx": _n(x), "cy": _n(y), "r": "3.5", "fill": COLOURS[css]},
        )
        value = f"{format_value(point.value)} {unit}".rstrip()
        SubElement(dot, "title").text = f"{point.label}: {value}"
    return _render(root)


def ranking_chart(
    *,
    ident: str,
    title: str,
    description: str,
    rows: Sequence[tuple[str, float, str]],
    x_label: str,
    y_label: str,
    empty: str,
) -> SafeString:
    """Horizontal bars, one row per (label, fraction 0-1, value text), on a 0-100 % axis;
    ``empty``: the text shown when there are no rows."""
    height = TOP + max(len(rows), 1) * ROW_HEIGHT + BOTTOM
    root = _svg(ident, title, description, height)
    left, plot_width = LABEL_WIDTH, WIDTH - LABEL_WIDTH - VALUE_WIDTH
    bottom = height - BOTTOM
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + tick * plot_width
        _line(root, x, TOP, x, bottom, "grid")
        _text(root, x, bottom + 16, percent(tick, 0), anchor="middle", css="tick")
    _text(root, left + plot_width / 2, height - 12, x_label, anchor="middle", css="axis-label")
    _text(root, 8, TOP - 14, y_label, css="axis-label")
    if not rows:
        _text(root, left + plot_width / 2, TOP + ROW_HEIGHT / 2 + 4, empty, anchor="middle")
    for index, (label, fraction, value) in enumerate(rows):
        y = TOP + index * ROW_HEIGHT
        short = label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"
        name = _text(root, left - 8, y + ROW_HEIGHT / 2 + 4, short, anchor="end", css="label")
        SubElement(name, "title").text = label
        rect = SubElement(
            root,
            "rect",
            {
                "class": "bar rate",
                "x": _n(left),
                "y": _n(y + 4),
                "width": _n(plot_width * fraction),
                "height": _n(ROW_HEIGHT - 8),
                "fill": COLOURS["rate"],
            },
        )
        SubElement(rect, "title").text = f"{label}: {value}"
        _text(root, left + plot_width + 8, y + ROW_HEIGHT / 2 + 4, value, css="value")
    _line(root, left, TOP, left, bottom, "axis")
    return _render(root)


def _svg(ident: str, title: str, description: str, height: int) -> Element:
    root = Element(
        "svg",
        {
            "xmlns": SVG_NAMESPACE,
            "id": ident,
            "class": "idempotency-chart",
            "viewBox": f"0 0 {WIDTH} {height}",
            "role": "img",
            "aria-labelledby": f"{ident}-title {ident}-desc",
            "font-size": "12",
            "font-family": "sans-serif",
        },
    )
    SubElement(root, "title", {"id": f"{ident}-title"}).text = str(title)
    SubElement(root, "desc", {"id": f"{ident}-desc"}).text = str(description)
    return root


def _y_axis(
    root: Element, levels: Sequence[float], format_value: Callable[[float], str], label: str
) -> None:
    plot_height = HEIGHT - TOP - BOTTOM
    for level in levels:
        y = TOP + plot_height * (1 - level / levels[-1])
        _line(root, LEFT, y, WIDTH - RIGHT, y, "grid")
        _text(root, LEFT - 6, y + 4, format_value(level), anchor="end", css="tick")
    middle = TOP + plot_height / 2
    text = _text(root, 0, 0, label, anchor="middle", css="axis-label")
    text.set("transform", f"translate(16 {_n(middle)}) rotate(-90)")


def _x_axis(root: Element, ticks: Sequence[tuple[float, str]], label: str) -> None:
    bottom = HEIGHT - BOTTOM
    _line(root, LEFT, bottom, WIDTH - RIGHT, bottom, "axis")
    for x, text in ticks:
        _line(root, x, bottom, x, bottom + 4, "axis")
        _text(root, x, bottom + 18, text, anchor="middle", css="tick")
    _text(
        root,
        LEFT + (WIDTH - LEFT - RIGHT) / 2,
        HEIGHT - 10,
        label,
        anchor="middle",
        css="axis-label",
    )


def _legend(root: Element, entries: Sequence[tuple[str, str]]) -> None:
    x = float(LEFT)
    for name, css in entries:
        if css == "rate":  # drawn as its line: dashes through a dot
            _line(root, x - 2, 16, x + 14, 16, "key rate")
            SubElement(
                root,
                "circle",
                {"class": "key rate", "cx": _n(x + 6), "cy": "16", "r": "3",
                 "fill": COLOURS[css], "stroke": "currentColor"},
            )  # fmt: skip
        else:
            SubElement(
                root,
                "rect",
                {"class": f"key {css}", "x": _n(x), "y": "10", "width": "12", "height": "12",
                 "fill": COLOURS[css]},
            )  # fmt: skip
        _text(root, x + 17, 20, name, css="legend")
        x += 17 + 6.6 * len(name) + 20


def _rate_line(
    root: Element, rate: Sequence[float | None], slots: Sequence[str], slot: float, label: str
) -> None:
    plot_height = HEIGHT - TOP - BOTTOM
    for level in (0.0, 0.5, 1.0):
        y = TOP + plot_height * (1 - level)
        _text(root, WIDTH - RIGHT + 6, y + 4, percent(level, 0), css="tick")
    text = _text(root, 0, 0, label, anchor="middle", css="axis-label")
    text.set("transform", f"translate({WIDTH - 12} {_n(TOP + plot_height / 2)}) rotate(90)")
    spots = [
        (LEFT + (index + 0.5) * slot, TOP + plot_height * (1 - value), index, value)
        for index, value in enumerate(rate)
        if value is not None
    ]
    if len(spots) > 1:
        SubElement(
            root,
            "polyline",
            {
                "class": "line rate",
                "points": " ".join(f"{_n(x)},{_n(y)}" for x, y, _, _ in spots),
                "fill": "none",
                "stroke": "currentColor",
                "stroke-width": "1.5",
                "stroke-dasharray": "4 3",
            },
        )
    for x, y, index, value in spots:
        dot = SubElement(
            root,
            "circle",
            {"class": "point rate", "cx": _n(x), "cy": _n(y), "r": "3", "fill": COLOURS["rate"],
             "stroke": "currentColor"},
        )  # fmt: skip
        SubElement(dot, "title").text = f"{slots[index]}: {percent(value)} {label}"


def _line(root: Element, x1: float, y1: float, x2: float, y2: float, css: str) -> None:
    line = SubElement(
        root,
        "line",
        {"class": css, "x1": _n(x1), "y1": _n(y1), "x2": _n(x2), "y2": _n(y2),
         "stroke": "currentColor", "stroke-opacity": "0.15" if css == "grid" else "0.6"},
    )  # fmt: skip
    if css == "key rate":
        line.set("stroke-dasharray", "4 3")
        line.set("stroke-opacity", "1")


def _text(
    root: Element, x: float, y: float, text: str, *, anchor: str = "start", css: str = ""
) -> Element:
    element = SubElement(
        root,
        "text",
        {"x": _n(x), "y": _n(y), "text-anchor": anchor, "fill": "currentColor", "class": css},
    )
    element.text = str(text)
    return element


def _n(value: float) -> str:
    """A coordinate, to a tenth of a unit."""
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _render(root: Element) -> SafeString:
    # ElementTree escaped every text and attribute value.
    return mark_safe(tostring(root, encoding="unicode"))
