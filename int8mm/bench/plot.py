"""The PNG: each provider's speed-up over the baseline, one panel per layer shape, M along the x axis."""
import math
from pathlib import Path

PANEL_COLUMNS = 4
PANEL_SIZE_IN = (4.0, 3.0)
LEGEND_COLUMNS = 4
LEGEND_ROW_IN = 0.25  # height kept below the panels per row of legend entries
TITLE_IN = 0.4


def plot_speedups(result, path: str | Path) -> None:
    """Draw ``result`` (a kernel-suite result) into ``path``. Needs matplotlib; uses no global pyplot state."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, whatever pyplot's backend is
    from matplotlib.ticker import FuncFormatter, NullFormatter

    baseline = result.meta["baseline"]
    rows = [r for r in result.rows if r["speedup"] is not None and r["provider"] != baseline]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    series = list(dict.fromkeys((r["provider"], r["mode"]) for r in rows))
    several_modes = len({mode for _, mode in series}) > 1
    providers = list(dict.fromkeys(p for p, _ in series))
    columns = max(1, min(PANEL_COLUMNS, len(shapes)))
    lines = max(1, math.ceil(len(shapes) / columns))
    legend_in = LEGEND_ROW_IN * (math.ceil(len(series) / LEGEND_COLUMNS) + 1)
    height = PANEL_SIZE_IN[1] * lines + legend_in + TITLE_IN
    fig = Figure(figsize=(PANEL_SIZE_IN[0] * columns, height))
    axes = fig.subplots(lines, columns, squeeze=False)
    colors = {p: f"C{i}" for i, p in enumerate(providers)}
    for ax, shape in zip(axes.flat, shapes):
        shape_rows = [r for r in rows if r["shape"] == shape]
        for provider, mode in series:
            points = sorted((r["m"], r["speedup"]) for r in shape_rows
                            if (r["provider"], r["mode"]) == (provider, mode))
            if not points:
                continue
            label = f"{provider} ({mode})" if several_modes else provider
            ax.plot([m for m, _ in points], [s for _, s in points], marker="o", color=colors[provider],
                    linestyle="--" if mode == "graph" else "-", label=label)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ms = sorted({r["m"] for r in shape_rows})
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.set_title(f"{shape} ({shape_rows[0]['k']} -> {shape_rows[0]['n']})", fontsize=9)
        ax.set_xlabel("M (rows per call)", fontsize=8)
        ax.set_ylabel(f"speed-up over {baseline}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shapes):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(LEGEND_COLUMNS, len(labels)), fontsize=8)
    meta = result.meta
    fig.suptitle(f"int8mm kernels: {meta['device']}, {meta['date'][:10]}", fontsize=10)
    fig.tight_layout(rect=(0, legend_in / height, 1, 1 - TITLE_IN / height))
    fig.savefig(path, dpi=110)
