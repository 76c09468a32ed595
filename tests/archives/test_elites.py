"""The elite archive (archive.json): a round trip, and atomic rewrites that a SIGKILL mid-write
never leaves half-written."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from archives.elites import read_elites, write_elites
from tests.conftest import ROOT


def test_elite_archive_round_trip(tmp_path):
    write_elites(tmp_path, [{"id": 1, "fitness": 0.2}, {"id": 2, "fitness": 0.9}], {"generation": 3})
    assert [e["id"] for e in read_elites(tmp_path)] == [2, 1]
    data = json.loads((tmp_path / "archive.json").read_text())
    assert data["summary"]["1"]["generation"] == 3


WRITER = """
import sys
from archives.elites import write_elites
elites = [{"id": i, "fitness": i / 100, "code": "x" * 4000} for i in range(300)]
print("ready", flush=True)
while True:
    write_elites(sys.argv[1], elites, {"generation": 1})
"""


@pytest.mark.slow
def test_elite_archive_survives_sigkill_mid_write(tmp_path):
    write_elites(tmp_path, [{"id": 0, "fitness": 0.0}], {"generation": 0})
    for attempt in range(8):
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE)
        process.stdout.readline()
        time.sleep(0.05 + 0.037 * attempt)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        elites = read_elites(tmp_path)  # parses: never a half-written file
        assert len(elites) in (1, 300)
