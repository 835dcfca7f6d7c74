"""The loss curve as a picture: raw loss per step and its smoothed line, on real axes.

One drawing for every front end (the tab's plot, the ComfyUI node's loss_curve output). matplotlib's
own Figure + Agg canvas: no pyplot, so no global figure state shared with a host that also plots.
The smoothing is TensorBoard's (an exponential moving average, debiased so the first steps are not
pulled towards 0), so the curve reads the same as the run's TensorBoard events. The validation
loss, when the run measures one, is drawn over it as points joined by a line.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

RAW, SMOOTH, VALIDATION = "#9db8e8", "#2860c8", "#e0701b"


def smoothed(values: Sequence[float], weight: float = 0.9) -> List[float]:
    out, average, n = [], 0.0, 0
    for value in values:
        n += 1
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** n))
    return out


def loss_image(losses: Sequence[float], width: int = 512, height: int = 256,
               val: Optional[Sequence[Tuple[int, float]]] = None, first_step: int = 1):
    """A PIL image of the curve (and of `val`, (step, val_loss) pairs); before the first step, empty axes that say so.
    `first_step`: the step of losses[0] (a resumed run's losses start after the resumed step)."""
    from PIL import Image

    fig = loss_figure(losses, width, height, val=val, first_step=first_step)
    fig.canvas.draw()
    size = fig.canvas.get_width_height()
    return Image.frombuffer("RGBA", size, fig.canvas.buffer_rgba(), "raw", "RGBA", 0, 1).convert("RGB")


def loss_figure(losses: Sequence[float], width: int, height: int, dpi: int = 100,
                val: Optional[Sequence[Tuple[int, float]]] = None, first_step: int = 1):
    """The matplotlib Figure (on its own Agg canvas) behind `loss_image`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [first_step + i for i, v in enumerate(losses) if math.isfinite(v)]
    values = [v for v in losses if math.isfinite(v)]
    val_points = [(int(s), float(v)) for s, v in val or () if math.isfinite(v)]
    if values or val_points:
        if values:
            ax.plot(steps, values, color=RAW, linewidth=1, marker="o" if len(values) == 1 else None, label="loss")
        if len(values) > 2:
            ax.plot(steps, smoothed(values), color=SMOOTH, linewidth=2, label="smoothed")
        if val_points:
            ax.plot(*zip(*val_points), color=VALIDATION, linewidth=1.5, marker="o", markersize=4, label="validation")
        ax.legend(loc="upper right", fontsize=8, frameon=False)
        title = [f"step {first_step + len(losses) - 1}"] + ([f"loss {values[-1]:.4g}"] if values else [])
        title += [f"val_loss {val_points[-1][1]:.4g}"] if val_points else []
        ax.set_title(", ".join(title), fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)  # an offset ("+1.04") would sit under the title
    else:
        ax.text(0.5, 0.5, "waiting for the first step", ha="center", va="center", transform=ax.transAxes,
                color="#666666")
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(True, color="#e6e6e6", linewidth=0.8)
    fig.tight_layout(pad=0.6)
    return fig
