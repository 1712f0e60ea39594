"""tests/support/harness.py's `postmasters`: a process a postmaster has just forked still shows
the postmaster's command line (Postgres renames its children a moment later), and must not
count as a second postmaster; the instance-cap test once saw "3 postmasters at once" under
max_instances = 2 that way."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.support.harness import postmasters, processes

FORKS = """
import os, sys, time
if os.fork() == 0:
    time.sleep(30)
    os._exit(0)
print("forked", flush=True)
time.sleep(30)
"""


def test_a_just_forked_child_is_not_a_second_postmaster(tmp_path):
    fake = tmp_path / "bin" / "postgres"  # a "postgres" whose child keeps its command line
    fake.parent.mkdir()
    fake.symlink_to(sys.executable)
    pgdata = tmp_path / "pgdata"
    proc = subprocess.Popen([str(fake), "-c", FORKS, "-D", str(pgdata)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"forked"
        deadline = time.monotonic() + 5
        while len(processes(b"/postgres", pgdata)) < 2:  # the child is there with the parent's argv
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert postmasters(pgdata) == [proc.pid]
    finally:
        for pid in processes(b"/postgres", pgdata):
            os.kill(pid, 9)
        proc.wait()
