"""Figures written next to results: the gate map with the selection marked, the effect per epoch, effect and
faithfulness curves.

Figures are drawn with matplotlib's object API (`matplotlib.figure.Figure`), imported when a figure is drawn: this
never touches pyplot's global state or the backend of a notebook that imports jaxtrace. Files are written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxtrace.core.sites import get_site
from jaxtrace.io.files import atomic_path


def _figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".") or "png")


def _subplots(figsize, ncols: int = 1, **kwargs):
    fig = _figure(figsize=figsize)
    return fig, fig.subplots(1, ncols, **kwargs)


def plot_gate_map(z: np.ndarray, mask: np.ndarray, site: str, path: Path, title: str = "", label: str = "z") -> None:
    """Layer x component heat map of z [L, C] (or another value in [0, 1], named `label`); selected components
    marked (heads) or counted per layer (units)."""
    n_layers, width = z.shape
    heads = get_site(site).heads
    fig, axes = _subplots((6 if heads else 11, 0.22 * n_layers + 2), 1 if heads else 2, squeeze=False,
                          gridspec_kw=None if heads else {"width_ratios": [4, 1]})
    ax = axes[0, 0]
    image = ax.imshow(z, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest", origin="lower")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_ylabel("layer")
    ax.set_xlabel(f"head (column {width - 1}: the MLP block)" if get_site(site).blocks else "head" if heads else "unit")
    if heads:
        layer, index = np.nonzero(mask)
        ax.scatter(index, layer, marker="s", s=60, facecolors="none", edgecolors="red", label="selected")
        ax.set_xticks(range(width))
    else:
        counts = mask.sum(1)
        axes[0, 1].barh(range(n_layers), counts, color="red")
        axes[0, 1].set_xlabel("selected units")
        axes[0, 1].set_ylim(-0.5, n_layers - 0.5)
    ax.set_title(title or f"{site}: {int(mask.sum())} of {z.size} selected")
    _save(fig, path)


def plot_effect_history(history: list[dict], effect_all: float, path: Path) -> None:
    """Effect of the binary mask and its size after each epoch, with the all-components effect for reference."""
    epochs = [row["epoch"] for row in history]
    fig, ax = _subplots((6, 3.5))
    ax.plot(epochs, [row["effect"] for row in history], "o-", label="circuit (binary mask)")
    ax.axhline(effect_all, color="gray", linestyle="--", label="all components")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean indirect effect")
    size = ax.twinx()
    size.plot(epochs, [row["selected"] for row in history], "s:", color="tab:red", label="selected")
    size.set_ylabel("selected components", color="tab:red")
    handles = ax.get_legend_handles_labels()[0] + size.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="best", fontsize=8)
    _save(fig, path)


def plot_effect_curve(rows: list[dict], methods, effect_all: float, path: Path, title: str) -> None:
    """Mean effect against the number of selected components, one line per method, all components dashed."""
    fig, ax = _subplots((6.5, 4))
    for method in methods:
        points = [(row["size"], row[method]) for row in rows if row[method] is not None]
        if points:
            main = method == "pgbct"
            ax.plot(*zip(*points), "o-" if main else ".-", label=method, linewidth=2 if main else 1)
    ax.axhline(effect_all, color="gray", linestyle="--", label="all components")
    ax.set_xlabel("selected components")
    ax.set_ylabel("mean indirect effect")
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_faithfulness_curves(curves: dict[str, dict], path: Path, title: str) -> None:
    """Effect share and faithfulness against the fraction of components kept (log axis), one line per ranking;
    `curves`: {method: {"fractions", "share", "faithfulness", "cpr", "cmd"}}."""
    fig, axes = _subplots((11, 4), 2, sharex=True)
    for method, curve in curves.items():
        main = method == "pgbct"
        style = {"linewidth": 2 if main else 1, "marker": "o" if main else "."}
        axes[0].plot(curve["fractions"], curve["share"], label=method, **style)
        axes[1].plot(curve["fractions"], curve["faithfulness"], **style,
                     label=f"{method} (CPR {curve['cpr']:.3f}, CMD {curve['cmd']:.3f})")
    axes[0].set_ylabel("effect share IE(S) / IE(all)")
    axes[1].set_ylabel("faithfulness 1 − IE(all \\ S) / IE(all)")
    for ax in axes:
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("fraction of components in the circuit (top of the ranking)")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def plot_single_effects(effects: np.ndarray, site: str, path: Path, title: str = "single-component effects",
                        label: str = "mean indirect effect alone") -> None:
    """Heat map of each component's effect alone (or another per-component score; layer x component)."""
    bound = float(np.abs(effects).max()) or 1.0
    fig, ax = _subplots((6, 0.22 * effects.shape[0] + 2))
    image = ax.imshow(effects, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest",
                      origin="lower")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_xlabel("head" if get_site(site).heads else "unit")
    ax.set_ylabel("layer")
    ax.set_title(f"{site}: {title}")
    _save(fig, path)


def plot_relative_depth(profiles: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> None:
    """Circuits of models of different depth on one axis: per model (fraction selected [L], mean z [L]) per layer,
    plotted at the relative depth (layer + 0.5) / L."""
    fig, axes = _subplots((11, 4), 2, sharex=True)
    for label, (selected, z) in profiles.items():
        depth = (np.arange(len(z)) + 0.5) / len(z)
        axes[0].plot(depth, selected, "o-", label=label)
        axes[1].plot(depth, z, "o-", label=label)
    axes[0].set_ylabel("fraction of the layer's components selected")
    axes[1].set_ylabel("mean z of the layer")
    for ax in axes:
        ax.set_xlabel("relative depth (layer + 0.5) / layers")
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def plot_effect_vs_size(points: list[dict], path: Path) -> None:
    """Effect against relative circuit size, one colour per model and one marker per task; each model's
    all-components effect is the hollow marker at size 1. `points`: {label, task, size, effect, effect_all}."""
    fig, ax = _subplots((7, 4.5))
    colours = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(p["label"] for p in points))}
    markers = {task: "osD^v<>p*h"[i % 10] for i, task in enumerate(dict.fromkeys(p["task"] for p in points))}
    for p in points:
        colour, marker = colours[p["label"]], markers[p["task"]]
        ax.scatter(p["size"], p["effect"], color=colour, marker=marker, s=50)
        ax.scatter(1.0, p["effect_all"], facecolors="none", edgecolors=colour, marker=marker, s=50)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=label) for label, c in colours.items()]
    handles += [Line2D([], [], color="gray", marker=m, linestyle="", label=task) for task, m in markers.items()]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xlabel("circuit size (fraction of the components; hollow: all components)")
    ax.set_ylabel("mean indirect effect")
    ax.set_xlim(-0.02, 1.05)
    _save(fig, path)
