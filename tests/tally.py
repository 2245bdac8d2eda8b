"""The fault-injection tally: a pytest plugin (registered in conftest.py) that the fault tests report to.

A test asks for the `tally` fixture and says what it tried: each bad input the server refused or neutralised,
each fault the server survived, and each run it created (with the outcome the tools reported). When the test
ends, every such run is looked up in its workspace's ledger: a run that is missing, still "running", or recorded
with another status or val_bpb than the tools reported is a lost record, and fails the test. The session ends
with one closing line, printed only when a fault test ran:

    fault-injection tally: 23 bad inputs tried, 14 faults survived, records lost: 0
"""

from pathlib import Path

import pytest

from server.ledger import Ledger


class Totals:
    def __init__(self):
        self.used = False
        self.bad_inputs = 0
        self.faults = 0
        self.lost = 0

    def line(self) -> str:
        return (f"fault-injection tally: {self.bad_inputs} bad inputs tried, {self.faults} faults survived, "
                f"records lost: {self.lost}")


class Tally:
    """One test's reports; counted into the session totals as they are made."""

    def __init__(self, totals: Totals):
        self.totals = totals
        self.runs: dict[tuple[Path, str], dict] = {}  # (workspace, run id) -> the latest result a tool returned

    def bad_input(self, count: int = 1) -> None:
        self.totals.bad_inputs += count

    def fault_survived(self, count: int = 1) -> None:
        self.totals.faults += count

    def run(self, workspace: Path, result: dict) -> dict:
        """Remember a run a tool reported (run_experiment, wait_for_run, cancel_run...); returns the result."""
        self.runs[(Path(workspace), result["run_id"])] = result
        return result

    def lost_records(self) -> list[str]:
        lost = []
        for (workspace, run_id), seen in self.runs.items():
            record = Ledger(workspace).run(run_id)
            if record is None:
                lost.append(f"{run_id}: not in the ledger")
            elif record.get("status") == "running":
                lost.append(f"{run_id}: still 'running' in the ledger after the test")
            elif seen["status"] != "running" and (record["status"], record.get("val_bpb")) != \
                    (seen["status"], seen.get("val_bpb")):
                lost.append(f"{run_id}: the tools said {seen['status']} / val_bpb {seen.get('val_bpb')}, the ledger "
                            f"says {record['status']} / val_bpb {record.get('val_bpb')}")
        return lost


TOTALS = Totals()


@pytest.fixture
def tally():
    TOTALS.used = True
    recorder = Tally(TOTALS)
    yield recorder
    lost = recorder.lost_records()
    TOTALS.lost += len(lost)
    assert not lost, "records lost: " + "; ".join(lost)


def pytest_sessionfinish(session):
    """Under pytest-xdist (-n N) each worker hands its totals to the controller, which prints the one line."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None and TOTALS.used:
        workeroutput["tally"] = [TOTALS.bad_inputs, TOTALS.faults, TOTALS.lost]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    counts = getattr(node, "workeroutput", {}).get("tally")
    if counts:
        TOTALS.used = True
        TOTALS.bad_inputs, TOTALS.faults, TOTALS.lost = (a + b for a, b in zip(
            (TOTALS.bad_inputs, TOTALS.faults, TOTALS.lost), counts))


def pytest_terminal_summary(terminalreporter):
    if TOTALS.used:
        terminalreporter.write_sep("-", "fault injection")
        terminalreporter.write_line(TOTALS.line())
