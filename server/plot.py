"""The overnight progress chart: val_bpb per experiment, kept runs highlighted, the running best as a step line."""

import io

import matplotlib

matplotlib.use("Agg")  # no display on a server; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

KEPT_COLOR = "#2a9d8f"
OTHER_COLOR = "#b0b0b0"
CRASH_COLOR = "#e76f51"


def progress_png(runs: list[dict]) -> bytes:
    """PNG bytes of the chart for these ledger runs (in run order); crashes sit on the floor as red crosses."""
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    measured = [(i, r) for i, r in enumerate(runs, 1) if r.get("val_bpb") is not None]
    kept = [(i, r["val_bpb"]) for i, r in measured if r.get("decision") == "keep"]
    others = [(i, r["val_bpb"]) for i, r in measured if r.get("decision") != "keep"]
    crashed = [i for i, r in enumerate(runs, 1) if r.get("status") not in ("succeeded", "running")]

    if others:
        ax.scatter(*zip(*others), s=22, color=OTHER_COLOR, label="discarded / undecided", zorder=2)
    if kept:
        ax.scatter(*zip(*kept), s=46, color=KEPT_COLOR, edgecolor="black", linewidth=0.5, label="kept", zorder=3)
        steps_x, steps_y, best = [], [], float("inf")
        for i, v in kept:
            best = min(best, v)
            steps_x.append(i)
            steps_y.append(best)
        steps_x.append(len(runs))
        steps_y.append(best)
        ax.step(steps_x, steps_y, where="post", color=KEPT_COLOR, linewidth=1.8, label="running best", zorder=1)
        ax.set_title(f"{len(runs)} experiments, {len(kept)} kept, best val_bpb {best:.6f}")
    else:
        ax.set_title(f"{len(runs)} experiments, none kept yet")
    if crashed:
        values = [r["val_bpb"] for _, r in measured]
        floor = min(values) if values else 0.0
        ax.scatter(crashed, [floor] * len(crashed), marker="x", color=CRASH_COLOR, label="crashed", zorder=2)
    ax.set_xlabel("experiment")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # experiments are counted, never 1.25 of one
    ax.grid(alpha=0.3)
    if runs:
        ax.set_xlim(0.5, len(runs) + 0.5)
        # outside the axes, under the title: the legend can cover no point, however the points fall
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=4, frameon=False, fontsize=9)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
