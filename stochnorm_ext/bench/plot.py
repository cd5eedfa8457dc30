"""The plot: one panel per layer and device, each answering "how long does a training step
(fwd+bwd) of this layer take compared with BatchNorm's?" in the table's sense: the /BN time
ratio, lower is better, log axis with BatchNorm at 1. Flagged rows are not drawn."""
from __future__ import annotations

import math
from typing import List

from stochnorm_ext.bench.cases import base_layer, case_of

# One panel per layer (base label), in this order, with its question.
PANELS = [("stoch_norm", "StochNorm"), ("bgn", "BGN"), ("cbn", "CBN normalisation step"),
          ("conv+cbn", "conv + CBN step, over conv + BN")]
IMPL_STYLE = {"published": ("tab:red", "s"), "reference": ("tab:gray", "x"), "cpu": ("tab:blue", "o"),
              "triton": ("tab:green", "^"), "cuda": ("tab:purple", "D")}
DIRECTION = "fwd+bwd"


def write_plot(path: str, rows: List[dict], environment: dict) -> None:
    fig = figure(rows, environment)
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt
    plt.close(fig)


def figure(rows: List[dict], environment: dict):
    """Per device, a row of panels (one per layer timed); in each, one line per
    implementation (published, reference, our backends) over the cases."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    devices = list(dict.fromkeys(r["device"] for r in rows))
    panels = [(layer, title) for layer, title in PANELS if any(base_layer(r["layer"]) == layer for r in rows)]
    ncases = max(len({case_of(r) for r in rows if r["device"] == d}) for d in devices)
    # Two panels a row, so that the figure reads at the width of a page.
    ncols, rows_per_device = min(2, len(panels)), math.ceil(len(panels) / 2)
    height = 4.6 * len(devices) * rows_per_device
    fig, grid = plt.subplots(len(devices) * rows_per_device, ncols, squeeze=False, sharey=True,
                             figsize=(ncols * min(max(5.0, 0.6 * ncases + 3.0), 20.0), height))
    per_device = rows_per_device * ncols
    for device_index, device in enumerate(devices):
        selected = [r for r in rows if r["device"] == device and r["direction"] == DIRECTION]
        cases = list(dict.fromkeys(case_of(r) for r in selected))
        cells = list(grid.flat[device_index * per_device:(device_index + 1) * per_device])
        axes = cells[:len(panels)]
        for extra in cells[len(panels):]:
            extra.remove()  # an odd number of panels leaves one cell empty
        for ax, (layer, title) in zip(axes, panels):
            mine = [r for r in selected if base_layer(r["layer"]) == layer]
            series = list(dict.fromkeys((r["layer"], r["impl"]) for r in mine))
            value = {(case_of(r), r["layer"], r["impl"]): r for r in mine}
            labels = list(dict.fromkeys(label for label, _ in series))  # bgn, bgn G=2C, ...
            hidden = sum(bool(r.get("flag")) for r in mine)
            for label, impl in series:
                color, marker = IMPL_STYLE.get(impl, ("black", "*"))
                found = [value.get((c, label, impl), {}) for c in cases]
                ratios = [r["ratio_to_bn"] if r.get("ratio_to_bn") and not r.get("flag") else math.nan
                          for r in found]
                name = impl if label == layer else f"{label} {impl}"
                ax.plot(range(len(cases)), ratios, color=color, marker=marker, label=name,
                        linestyle=("-", "--", ":", "-.")[labels.index(label) % 4])
            ax.axhline(1.0, color="black", linewidth=1.0,
                       label="conv + BN = 1" if layer.startswith("conv+") else "BatchNorm = 1")
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{device}: {title}" + (f"\n({hidden} flagged row{'s' if hidden != 1 else ''} not drawn)"
                                                  if hidden else ""),
                         fontsize=10)
            ax.set_xticks(range(len(cases)), [c.label for c in cases], rotation=30 if len(cases) <= 12 else 90,
                          ha="right", fontsize=8 if len(cases) <= 24 else 6)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8, loc="best")
            if axes.index(ax) % ncols == 0:
                ax.set_ylabel(f"{DIRECTION} time / BatchNorm's\n(lower is better; 1 = BatchNorm)")
        low, high = axes[0].get_ylim()
        axes[0].set_ylim(min(low, 0.5), max(high, 2.0))  # both sides of BatchNorm in view
    info = "; ".join(f"{d}: {environment['devices'][d]['name']}" for d in devices)
    fig.suptitle(f"stochnorm_ext bench: training step ({DIRECTION}) time over BatchNorm's, median of "
                 f"{environment['rounds']} rounds\n{info}; torch {environment['torch']}, commit "
                 f"{environment['commit']}" + (" (uncommitted changes)" if environment["dirty"] else ""),
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))  # room for the two-line title
    return fig
