"""DBD::Pg (Perl, Debian's libdbd-pg-perl on the system's libpq 15) through the gateway: every
scenario of contract.py it can do, run by perl/dbd_pg_scenarios.pl in one perl process."""

from __future__ import annotations


import pytest

from .conftest import interpreter_scenarios
from .contract import ClientContract


@pytest.fixture(scope="module")
def results(target):
    return interpreter_scenarios("perl", ["-MDBD::Pg", "-e1"], "libdbd-pg-perl (DBD::Pg)", "perl/dbd_pg_scenarios.pl", target)


class TestDbdPg(ClientContract):
    UNSUPPORTED = {
        "direct_tls": "DBD::Pg uses the system's libpq 15 here; sslnegotiation=direct needs libpq 17",
    }
