"""postgres.js (npm `postgres`) through the gateway: every scenario of contract.py it can do,
run by node/postgres_scenarios.js in one node process."""

from __future__ import annotations

import pytest

from .conftest import node_scenarios
from .contract import ClientContract


@pytest.fixture(scope="module")
def results(target):
    return node_scenarios("postgres_scenarios.js", "postgres", target)


class TestPostgresJs(ClientContract):
    UNSUPPORTED = {
        "notify_sender_pid": "postgres.js 3.4 drops a notification's sender pid (its onnotify and "
                             "sql.listen callbacks get channel and payload only)",
        "channel_binding": "postgres.js 3.4 speaks SCRAM-SHA-256 only, never SCRAM-SHA-256-PLUS",
    }
    TERMINATE_SAYS_WHY = False  # the FATAL on an idle pooled connection is not surfaced

    def test_terminate_backend(self, scenario, target):
        super().test_terminate_backend(scenario, target)
        r = scenario("terminate")
        assert r["new_pid"] != r["pid"]  # the pool reconnected to a new backend
