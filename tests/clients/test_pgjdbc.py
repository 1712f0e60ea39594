"""pgjdbc (Debian's libpostgresql-jdbc-java) through the gateway: every scenario of contract.py
it can do, run by java/PgjdbcScenarios.java in one JVM (single-file source launch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import HERE, INSTALL_HINT, require_program, run_scenarios
from .contract import ClientContract

JAR = Path("/usr/share/java/postgresql.jar")


@pytest.fixture(scope="module")
def results(target, tmp_path_factory):
    java = require_program("java")
    if not JAR.exists():
        pytest.skip(f"pgjdbc is not installed ({JAR}, Debian package libpostgresql-jdbc-java): {INSTALL_HINT}")
    # the JVM resolves names from this file alone: the SNI name without DNS
    hosts = tmp_path_factory.mktemp("pgjdbc") / "hosts"
    hosts.write_text(f"127.0.0.1 {target.sni_name}\n")
    return run_scenarios([java, "-cp", str(JAR), f"-Djdk.net.hosts.file={hosts}",
                          str(HERE / "java" / "PgjdbcScenarios.java")], target)


class TestPgjdbc(ClientContract):
    UNSUPPORTED = {
        "channel_binding": "pgjdbc 42.5.5 (Debian 12's package) builds its SCRAM client with channel "
                           "binding off: it never picks SCRAM-SHA-256-PLUS",
        "direct_tls": "pgjdbc 42.5.5 always sends SSLRequest first (it has no sslNegotiation=direct)",
    }
