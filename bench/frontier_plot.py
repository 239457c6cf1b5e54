"""The frontier's plot: one column per model (full range above, zoomed on the points near the float model
below), ours in colour, the Brevitas peers in grey, the float model and the W8 controls as lines.

Split from ``bench/frontier.py`` (which imports it; see its docstring for what the points are). Reads rows as
``frontier.read_rows`` returns them: strings, as in the CSV.
"""
from __future__ import annotations

import csv
from pathlib import Path

from _harness import machine

__all__ = ["PEER_FAMILIES", "ZOOM_POINTS", "PlotError", "peer_label", "read_peers", "zoom_range", "plot"]

CONTROL_BITS = 8  # the W8 control rows (frontier.CONTROL_BITS)


class PlotError(Exception):
    """What stops the plot (no matplotlib, nothing to draw): one line for the user."""


def _as_bool(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def target_of(row: dict) -> float | None:
    """The target of a mixed-precision row (from its tag ``...-t<T>``), None for a uniform one."""
    tag = row["tag"]
    return float(tag.rsplit("-t", 1)[1]) if "-t" in tag else None


def _rows(path) -> list[dict]:
    path = Path(path)
    if not path.exists() or not path.stat().st_size:
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


PEER_FAMILIES = [  # (prefix of the method column of peers.csv, label, marker)
    ("rtn_minmax", "RTN", "x"),
    ("mse_ranges", "MSE ranges", "+"),
    ("gptq_actorder_minmax", "GPTQ", "D"),
    ("gptq_actorder_mse", "GPTQ-MSE", "d"),
    ("adaround_like", "AdaRound-like", "v"),
    ("brecq_like", "BRECQ-like", "P"),
]
BIT_COLOURS = {2: "tab:red", 3: "tab:green", 4: "tab:blue"}
MIXED_COLOUR = "tab:orange"
PEER_JITTER = 0.02  # bits between two peer families drawn at the same width (display only)


def peer_label(method: str) -> tuple[str, str]:
    """The short legend label and the marker of a peers.csv method (a learning-rate suffix is kept)."""
    for prefix, label, marker in PEER_FAMILIES:
        if method.startswith(prefix):
            if "_lr" in method:
                label += f" (lr {method.rsplit('_lr', 1)[1]})"
            return label, marker
    return method, "*"


def read_peers(path, model: str) -> list[dict]:
    """The peers' rows of ``model`` (empty when the file is missing)."""
    return [r for r in _rows(path) if r.get("model") == model]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError('plotting needs matplotlib: pip install -e ".[bench]" (or pass --no-plot)') from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _draw_ours(ax, rows: list[dict]) -> None:
    """Our points: one line per (bits, label mode) joining its budgets, each point marked with its budget."""
    groups: dict = {}
    for r in rows:
        if target_of(r) is not None:
            continue
        if int(r["bits"]) != CONTROL_BITS:
            groups.setdefault((int(r["bits"]), _as_bool(r["labels"])), []).append(r)
    for (bits, labels), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1])):
        rs.sort(key=lambda r: float(r["budget"]))
        xs, ys = [float(r["equiv_bits"]) for r in rs], [float(r["acc"]) for r in rs]
        ax.plot(xs, ys, color=BIT_COLOURS.get(bits, "black"), marker="o" if labels else "^",
                linestyle="-" if labels else ":", markersize=6, linewidth=1.5,
                label=f"CoRa W{bits}, {'labels' if labels else 'no labels'}")
        for x, y, r in zip(xs, ys, rs):
            ax.annotate(f"{100 * float(r['budget']):g}%", (x, y), textcoords="offset points", xytext=(4, -9 if labels else 4),
                        fontsize=6, color=BIT_COLOURS.get(bits, "black"))


def _draw_mixed(ax, rows: list[dict]) -> None:
    """Mixed-precision points: one line per (budget, label mode) joining the targets, each marked with its target."""
    groups: dict = {}
    for r in rows:
        if target_of(r) is not None:
            groups.setdefault((float(r["budget"]), _as_bool(r["labels"])), []).append(r)
    for (budget, labels), rs in sorted(groups.items()):
        rs.sort(key=target_of)
        xs, ys = [float(r["equiv_bits"]) for r in rs], [float(r["acc"]) for r in rs]
        ax.plot(xs, ys, color=MIXED_COLOUR, marker="s", linestyle="-" if labels else ":", markersize=6, linewidth=1.5,
                label=f"CoRa mixed widths, adapters {100 * budget:g}%, {'labels' if labels else 'no labels'}")
        for x, y, r in zip(xs, ys, rs):
            ax.annotate(f"T {target_of(r):g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6,
                        color=MIXED_COLOUR)


def _draw_peers(ax, peers: list[dict]) -> None:
    """The peers in grey, one marker per method, each family nudged sideways by a few hundredths of a bit
    (``PEER_JITTER``) so that the methods at the same width do not hide each other."""
    for r in peers:
        label, marker = peer_label(r["method"])
        family = next((i for i, (prefix, _, _) in enumerate(PEER_FAMILIES) if r["method"].startswith(prefix)), 0)
        x = float(r["bits_per_weight"]) + PEER_JITTER * (family - (len(PEER_FAMILIES) - 1) / 2)
        tone = "0.65" if "(lr" in label else "0.35"
        ax.scatter(x, float(r["acc"]), marker=marker, color=tone, s=40, zorder=3, label=f"Brevitas {label} (no labels)")


def _draw_lines(ax, rows: list[dict], peers: list[dict]) -> None:
    """Horizontal lines: the float model and the W8 controls."""
    floats = [float(r["float_acc"]) for r in rows] or [float(r["float_acc"]) for r in peers]
    if floats:
        ax.axhline(floats[0], color="black", linestyle="--", linewidth=1, label="float model")
    for r in rows:
        if int(r["bits"]) == CONTROL_BITS:
            labels = _as_bool(r["labels"])
            ax.axhline(float(r["acc"]), color="purple", linestyle="-." if labels else (0, (1, 3)), linewidth=1,
                       label=f"W8 control, {'labels' if labels else 'no labels'} "
                             f"({float(r['equiv_bits']):.2f} bits, budget {r['budget']})")


ZOOM_POINTS = 6.0  # the zoomed panel shows the points at most this far below the float model


def zoom_range(rows: list[dict], peers: list[dict]) -> tuple[float, float]:
    """The y-range of the zoomed panel: every point (ours, peers, W8 controls) at most ``ZOOM_POINTS`` below the
    float model, and the float model, with a margin; the full 0-100 when there is no float accuracy."""
    floats = [float(r["float_acc"]) for r in rows + peers if r.get("float_acc") not in (None, "")]
    if not floats:
        return 0.0, 100.0
    top = floats[0]
    near = [float(r["acc"]) for r in rows + peers if float(r["acc"]) >= top - ZOOM_POINTS] + [top]
    return min(near) - 0.5, max(near) + 0.5


def plot(rows: list[dict], peers_path, png, models, tag: str) -> Path:
    """Draw the frontier of ``rows`` (one tag) and the peers to ``png``; returns its path."""
    plt = _pyplot()
    models = [m for m in models if any(r["model"] == m for r in rows) or read_peers(peers_path, m)]
    if not models:
        raise PlotError(f"nothing to plot: no rows of tag {tag} and no peers for the selected models")
    fig, axes = plt.subplots(2, len(models), figsize=(7 * len(models) + 3.6, 12), squeeze=False,
                             gridspec_kw={"height_ratios": (1, 1.3)})
    for col, model in enumerate(models):
        mine, peers = [r for r in rows if r["model"] == model], read_peers(peers_path, model)
        n_eval = sorted({r["eval_images"] for r in mine})
        for row, ax in enumerate(axes[:, col]):
            _draw_lines(ax, mine, peers)
            _draw_peers(ax, peers)
            _draw_ours(ax, mine)
            _draw_mixed(ax, mine)
            ax.set_xlabel("equivalent bits per weight (adapters included)")
            ax.set_ylabel("CIFAR-10 top-1 %")
            ax.grid(True, alpha=0.3)
        axes[0, col].set_title(f"{model}  (ours: {'/'.join(n_eval) or '-'} test images; peers: 10000)", fontsize=10)
        lo, hi = zoom_range(mine, peers)
        axes[1, col].set_ylim(lo, hi)
        axes[1, col].set_title(f"{model}, zoomed: the points within {ZOOM_POINTS:g} points of the float model",
                               fontsize=10)
    handles = {}
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8, frameon=False)
    where = sorted({r["machine"] for r in rows}) or [machine()]
    commits = sorted({r["commit"] for r in rows})
    fig.suptitle(f"Accuracy vs equivalent bits (tag {tag}; commit {', '.join(commits) or '-'})\n{'; '.join(where)}",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 3.6 / fig.get_figwidth(), 1))  # the legend's column on the right
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=130)
    plt.close(fig)
    return png
