"""Secrets never reach logs or clients: passwords, SCRAM verifiers and S3 keys, through
successful and failed logins, creation, snapshots and a storage outage, at DEBUG level."""

from __future__ import annotations

import base64
import logging
import secrets

from gateway.wire.scram import parse_verifier

from ..support.harness import conninfo, connect_sqlstate, psql


def test_no_secret_in_logs_or_client_errors(start_gateway, tls, s3_settings, s3_proxy, caplog):
    caplog.set_level(logging.DEBUG)
    secret_key = "S3SECRET-" + secrets.token_hex(12)
    password = "PW-" + secrets.token_hex(12)
    wrong = "WRONG-" + secrets.token_hex(12)
    gw = start_gateway(**{**s3_settings, "s3_secret_key": secret_key, "log_level": "DEBUG"})
    # moto accepts any secret: the requests below really go out signed with it
    gw.create_db("sec", password)
    role = gw.gw.catalog.roles("sec")["postgres"]
    info = parse_verifier(role.verifier)
    verifier_parts = [role.verifier, base64.b64encode(info.stored_key).decode(),
                      base64.b64encode(info.server_key).decode()]

    outputs = []
    outputs.append(psql(conninfo(gw.port, tls["ca"], "sec", password=password), "select 1").stderr)
    outputs.append(psql(conninfo(gw.port, tls["ca"], "sec", password=wrong), "select 1").stderr)
    assert connect_sqlstate(gw.port, tls["ca"], "sec", password=wrong) == "28P01"
    gw.call(lambda: gw.gw.instances.stop("sec"))  # snapshot to S3
    # running again (a clean stop gave its lease up: waking it needs storage)
    assert psql(conninfo(gw.port, tls["ca"], "sec", password=password), "select 1").returncode == 0
    s3_proxy.cut()
    assert psql(conninfo(gw.port, tls["ca"], "sec", password=password), "create table t(x int)").returncode == 0
    gw.call(lambda: gw.gw.instances.stop("sec"))  # the upload fails and is logged
    s3_proxy.restore()

    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    # the log and the clients did see these events, so the checks below are not vacuous
    assert "storage" in logged and "saving sec" in logged
    assert "password authentication failed" in outputs[1]
    for text in [logged, *outputs]:
        for secret in [secret_key, password, wrong, *verifier_parts]:
            assert secret not in text
