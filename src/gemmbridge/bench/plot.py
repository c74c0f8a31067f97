"""The bench's PNG: a roofline chart per dtype — TFLOP/s against arithmetic intensity (FLOPs per byte moved).

The roofline ``min(peak, bandwidth × FLOPs/byte)`` is a solid line: rising with the measured copy bandwidth,
flat at the dtype's measured peak. Each candidate's shapes are points under it, so a memory-bound shape (LoRA,
decode) shows how close each candidate gets to what the card's bandwidth allows. Drawn with matplotlib's Agg
canvas (no display needed).
"""

from __future__ import annotations

from typing import Any

import numpy as np

MARKERS = {"gemmbridge": "o", "torch": "s", "numpy": "D", "triton": "^", "cupy": "v", "nvmath": "P"}
COLORS = {
    "gemmbridge": "tab:red", "torch": "tab:blue", "numpy": "tab:purple",
    "triton": "tab:green", "cupy": "tab:orange", "nvmath": "tab:brown",
}  # fmt: skip


def figure(doc: dict[str, Any]) -> Any:
    """The matplotlib ``Figure`` for the bench document ``doc``: one roofline panel per dtype."""
    from matplotlib.figure import Figure

    dtypes = doc["settings"]["dtypes"]
    cols = min(len(dtypes), 2)
    rows = (len(dtypes) + cols - 1) // cols
    fig = Figure(figsize=(7.5 * cols, 5.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(dtypes) :]:
        ax.set_visible(False)
    for ax, label in zip(axes, dtypes):
        _panel(ax, doc, label)
    fig.suptitle(f"gemmbridge bench · {doc['card']} · {doc['date'][:10]}", fontsize=11)
    return fig


def plot(doc: dict[str, Any], path: str) -> None:
    """Write the figure for the bench document ``doc`` to ``path`` (PNG)."""
    figure(doc).savefig(path, dpi=110)


def _panel(ax: Any, doc: dict[str, Any], label: str) -> None:
    rows = sorted((r for r in doc["rows"] if r["dtype"] == label), key=lambda r: r["intensity"])
    peak = doc["peaks"].get(label, {}).get("tflops")
    bandwidth = doc["bandwidth"]["bytes_per_s"]
    if rows and peak and bandwidth:
        low, high = rows[0]["intensity"], rows[-1]["intensity"]
        ridge = peak * 1e12 / bandwidth  # the intensity where the bandwidth term meets the peak
        xs = np.geomspace(min(low, ridge) / 2, max(high, ridge) * 2, 200)
        ax.plot(xs, np.minimum(peak, bandwidth * xs / 1e12), color="0.45", linewidth=2, zorder=1,
                label=f"roofline: min(peak {peak:.4g}, {bandwidth / 1e12:.3g} TB/s × FLOPs/byte)")  # fmt: skip
    for cand in doc["candidates"]:
        name = cand["name"]
        points = [(r["intensity"], r["results"][name]["tflops"], r["preset"]) for r in rows
                  if r["results"][name]["status"] == "ok"]  # fmt: skip
        if not points:
            continue
        style = {"color": COLORS.get(name, "black"), "marker": MARKERS.get(name, "x")}
        ours = name == "gemmbridge"  # drawn last and a little larger: the subject of the plot
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=40 if ours else 30, alpha=0.9 if ours else 0.75,
                   zorder=4 if ours else 3, label=name, **style)  # fmt: skip
        sweep = [p for p in points if p[2] == "square"]
        if len(sweep) > 1:
            ax.plot(
                [p[0] for p in sweep], [p[1] for p in sweep], color=style["color"], linewidth=1, alpha=0.6, zorder=2
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOPs per byte read and written)")
    ax.set_ylabel("TFLOP/s")
    square = any(r["preset"] == "square" for r in rows)
    ax.set_title(f"{label} (lines: square sweep)" if square else label, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
