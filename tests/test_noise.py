"""The noise floor: seeded re-runs of the kept commit, recorded like any run, and results judged against them."""

import anyio
import pytest
from mcp import Client

from server.app import create_server
from server.research import Settings
from support import call

SIGMA = 0.01


@pytest.fixture
def server(workspace, prepared_cache):
    return create_server(Settings(workspace=workspace, profile="smoke", dataset="sotu", cache=prepared_cache,
                                  budget_seconds=2.0))


def finished_run(run_id: str, commit: str, val_bpb: float, session: str, decision=None) -> dict:
    return {"type": "run", "id": run_id, "session": session, "commit": commit, "description": run_id,
            "status": "succeeded", "kind": "experiment", "val_bpb": val_bpb, "metrics": {}, "profile": "smoke",
            "dataset": "sotu", "decision": decision}


def test_results_are_judged_in_units_of_a_known_spread(server):
    research = server.research

    async def main():
        async with Client(server) as client:
            await call(client, "start_session", tag="noise")
            head = research.git.head()
            ledger = research.ledger
            ledger.append({"type": "noise", "profile": "smoke", "dataset": "sotu", "commit": head,
                           "run_ids": [], "values": [1.0 - SIGMA, 1.0, 1.0 + SIGMA], "mean": 1.0, "std": SIGMA})
            ledger.append(finished_run("r0001", head, 1.0, "noise", decision="keep"))
            ledger.append(finished_run("r0002", head, 1.0 - 1.5 * SIGMA, "noise", decision="discard"))
            ledger.append(finished_run("r0003", head, 1.0 - 3 * SIGMA, "noise"))

            within = await call(client, "wait_for_run", run_id="r0002")
            assert within["delta_in_sigma"] == pytest.approx(-1.5)
            assert within["within_noise"] is True

            beyond = await call(client, "wait_for_run", run_id="r0003")
            assert beyond["delta_in_sigma"] == pytest.approx(-3.0)
            assert beyond["within_noise"] is False
            assert "keep" in beyond["next_step"]

            status = await call(client, "status")
            assert status["noise_floor"]["std"] == SIGMA
            assert (await call(client, "results"))["noise_floor"]["repeats"] == 3

    anyio.run(main)


def test_measure_noise_records_its_runs_like_any_other_and_runs_them_at_once_on_a_pool(workspace, prepared_cache):
    server = create_server(Settings(workspace=workspace, profile="smoke", dataset="sotu", cache=prepared_cache,
                                    budget_seconds=2.0, devices="cpu:2"))
    research = server.research

    async def main():
        async with Client(server) as client:
            await call(client, "start_session", tag="floor")
            baseline = await call(client, "run_experiment", description="baseline")
            await call(client, "keep", run_id=baseline["run_id"])
            floor = await call(client, "measure_noise", repeats=2)
            assert floor["commit"] == baseline["commit"]
            assert floor["repeats"] == 3  # two seeded re-runs plus the kept baseline itself
            assert floor["std"] >= 0

            runs = research.ledger.runs("floor")
            noise_runs = [r for r in runs if r.get("kind") == "noise"]
            assert [r["seed"] for r in noise_runs] == [43, 44]
            assert all(r["status"] == "succeeded" and r["commit"] == baseline["commit"] for r in noise_runs)
            assert all(r["metrics"].get("seed") == r["seed"] for r in noise_runs)  # the summary prints the seed
            # the pool had room for both: they trained at once, one on each slot
            first, second = noise_runs
            assert {first["device"], second["device"]} == {"cpu:0", "cpu:1"}
            assert second["started_at"] < first["ended_at"] and first["started_at"] < second["ended_at"]
            rows = (await call(client, "results"))["rows"]
            assert [r["run_id"] for r in rows] == [r["id"] for r in runs]  # nothing hidden
            assert research.git.head() == baseline["commit"]

    anyio.run(main)
