"""node-postgres (npm `pg` with pg-copy-streams) through the gateway: every scenario of
contract.py, run by node/pg_scenarios.js in one node process."""

from __future__ import annotations

import pytest

from .conftest import node_scenarios
from .contract import ClientContract


@pytest.fixture(scope="module")
def results(target):
    return node_scenarios("pg_scenarios.js", "pg", target)


class TestNodePostgres(ClientContract):
    pass
