"""ruby-pg (Debian's ruby-pg, on the system's libpq 15) through the gateway: every scenario of
contract.py it can do, run by ruby/pg_scenarios.rb in one ruby process."""

from __future__ import annotations


import pytest

from .conftest import interpreter_scenarios
from .contract import ClientContract


@pytest.fixture(scope="module")
def results(target):
    return interpreter_scenarios("ruby", ["-e", "require 'pg'"], "ruby-pg", "ruby/pg_scenarios.rb", target)


class TestRubyPg(ClientContract):
    UNSUPPORTED = {
        "direct_tls": "ruby-pg uses the system's libpq 15 here; sslnegotiation=direct needs libpq 17",
    }
