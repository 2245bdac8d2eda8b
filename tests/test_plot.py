"""The progress chart (server/plot.py): with several devices or nodes a lane under the chart shows where each
experiment ran; runs waiting or training are never drawn as crashes."""

import struct

from server.plot import LANE_MAX_INCHES, natural_key, outcome, progress_png


def height_px(png: bytes) -> int:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])[1]


def runs_on(devices: list[str], node=lambda i: "vm") -> list[dict]:
    return [{"id": f"r{i:04d}", "status": "succeeded", "val_bpb": 1.5 - 0.01 * i,
             "decision": "keep" if i % 2 else "discard", "device": device, "node": node(i)}
            for i, device in enumerate(devices)]


def test_one_device_is_one_chart_and_several_add_a_lane_that_stops_growing():
    one = height_px(progress_png(runs_on(["cpu"] * 6)))
    two = height_px(progress_png(runs_on(["cpu:0", "cpu:1"] * 3)))
    sixty_four = height_px(progress_png(runs_on([f"cuda:{i}" for i in range(64)])))
    assert one == 500 and one < two < sixty_four <= 500 + LANE_MAX_INCHES * 100
    nodes = height_px(progress_png(runs_on(["cuda:0"] * 6, node=lambda i: f"node{i % 2}")))
    assert nodes > one  # the same GPU index on two nodes is two devices


def test_queued_and_training_runs_are_in_flight_never_crashed():
    assert [outcome({"status": s}) for s in ("queued", "starting", "running")] == ["in flight"] * 3
    assert [outcome({"status": s}) for s in ("crashed", "timed_out", "cancelled", "interrupted")] == ["crashed"] * 4
    assert outcome({"status": "succeeded", "decision": "keep"}) == "kept"
    assert outcome({"status": "succeeded", "decision": None}) == "other"


def test_devices_sort_as_people_count():
    assert sorted(["cuda:10", "cuda:2", "cuda:1"], key=natural_key) == ["cuda:1", "cuda:2", "cuda:10"]


def test_an_empty_session_still_draws():
    assert height_px(progress_png([])) == 500
