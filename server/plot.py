"""The overnight progress chart: val_bpb per experiment, kept runs highlighted, the running best as a step line;
with several devices or nodes, a lane under it shows where each experiment ran (a GPU whose runs all crash, or a
slow node, stands out)."""

import io
import re

import matplotlib

matplotlib.use("Agg")  # no display on a server; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from server.ledger import ran_on  # noqa: E402

KEPT_COLOR = "#2a9d8f"
OTHER_COLOR = "#b0b0b0"
CRASH_COLOR = "#e76f51"
IN_FLIGHT_COLOR = "#4a78b5"
IN_FLIGHT = ("queued", "starting", "running")
UNKNOWN_DEVICE = "unknown"  # a run recorded before runs named their device
LANE_INCHES_PER_DEVICE = 0.22  # the device lane grows with the devices, up to
LANE_MAX_INCHES = 4.0
LANE_MAX_LABELS = 24  # more devices than this: every k-th one is named


def progress_png(runs: list[dict]) -> bytes:
    """PNG bytes of the chart for these ledger runs (in run order); crashes sit on the floor as red crosses."""
    where = [ran_on(r, runs) or UNKNOWN_DEVICE for r in runs]
    devices = sorted(set(where), key=natural_key)
    lane = None
    if len(devices) > 1:
        lane_inches = min(LANE_MAX_INCHES, 0.6 + LANE_INCHES_PER_DEVICE * len(devices))
        fig, (ax, lane) = plt.subplots(2, 1, sharex=True, figsize=(10, 5 + lane_inches), dpi=100,
                                       gridspec_kw={"height_ratios": [5, lane_inches]})
    else:
        fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    measured = [(i, r) for i, r in enumerate(runs, 1) if r.get("val_bpb") is not None]
    kept = [(i, r["val_bpb"]) for i, r in measured if r.get("decision") == "keep"]
    others = [(i, r["val_bpb"]) for i, r in measured if r.get("decision") != "keep"]
    crashed = [i for i, r in enumerate(runs, 1) if outcome(r) == "crashed"]

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
        title = f"{len(runs)} experiments, {len(kept)} kept, best val_bpb {best:.6f}"
    else:
        title = f"{len(runs)} experiments, none kept yet"
    if len(devices) == 1 and devices[0] != UNKNOWN_DEVICE:
        title += f", on {devices[0]}"
    elif lane is not None:
        title += f", on {len(devices)} devices"
    ax.set_title(title)
    if crashed:
        values = [r["val_bpb"] for _, r in measured]
        floor = min(values) if values else 0.0
        ax.scatter(crashed, [floor] * len(crashed), marker="x", color=CRASH_COLOR, label="crashed", zorder=2)
    (lane if lane is not None else ax).set_xlabel("experiment")
    ax.set_ylabel("val_bpb (lower is better)")
    if lane is not None:
        draw_lane(lane, runs, where, devices)
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


def natural_key(label: str) -> list:
    """cuda:2 before cuda:10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", label)]


def outcome(run: dict) -> str:
    """kept, in flight, crashed (any failure), or other (discarded or undecided)."""
    if run.get("decision") == "keep":
        return "kept"
    if run.get("status") in IN_FLIGHT:
        return "in flight"
    return "other" if run.get("status") == "succeeded" else "crashed"


def draw_lane(lane, runs: list[dict], where: list[str], devices: list[str]) -> None:
    """One row per device (node/device on a cluster), one tick per experiment on the row that ran it, coloured as
    in the chart above."""
    row = {device: i for i, device in enumerate(devices)}
    colors = {"other": OTHER_COLOR, "crashed": CRASH_COLOR, "kept": KEPT_COLOR, "in flight": IN_FLIGHT_COLOR}
    for kind, color in colors.items():
        points = [(i, row[w]) for i, (r, w) in enumerate(zip(runs, where), 1) if outcome(r) == kind]
        if points:
            lane.scatter(*zip(*points), marker="|", s=120, linewidths=2, color=color, zorder=2)
    step = max(1, -(-len(devices) // LANE_MAX_LABELS))
    lane.set_yticks(range(0, len(devices), step), devices[::step], fontsize=8 if step == 1 else 7)
    lane.set_ylim(len(devices) - 0.5, -0.5)  # the first device on top
    lane.set_ylabel("ran on", fontsize=9)
    lane.grid(axis="x", alpha=0.3)
