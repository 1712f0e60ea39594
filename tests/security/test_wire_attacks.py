"""Attacks on the client-facing protocol surface (a review of gateway/wire and gateway/proxy):
an unauthenticated stranger and an authenticated tenant of one database, speaking raw bytes.
Each test reproduces one defect and passes once it is fixed; each first shows that the attack
step really ran (the exchange reached the point it attacks)."""

from __future__ import annotations

import time

from gateway.wire import protocol as p

from ..e2e.test_shutdown import serve  # noqa: F401  (fixture)
from ..support.harness import DOMAIN
from ..support.rawclient import RawClient


def _sasl_client(gateway, tls, user: str, db_id: str = "app1") -> tuple[RawClient, list[str]]:
    """A stranger over TLS with SNI, its startup message sent and AuthenticationSASL read:
    (the client, the mechanisms offered)."""
    raw = RawClient(gateway.port)
    raw.start_tls(str(tls["ca"]), f"{db_id}.{DOMAIN}")
    raw.startup({"user": user, "database": "postgres"})
    auth = raw.next_backend()
    assert isinstance(auth, p.Authentication) and auth.code == p.AUTH_SASL, auth
    return raw, p.sasl_mechanisms(auth)


def _answer_to_first(gateway, tls, user: str, mechanism: str, client_first: bytes) -> p.ErrorResponse:
    raw, mechanisms = _sasl_client(gateway, tls, user)
    try:
        assert mechanisms == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"], mechanisms  # TLS: -PLUS offered
        raw.send(p.SASLInitialResponse(mechanism, client_first).encode())
        answer = raw.next_backend()
        assert isinstance(answer, p.ErrorResponse), answer
        return answer
    finally:
        raw.close()


def test_channel_binding_errors_do_not_tell_which_roles_exist(gateway, tls):
    """Postgres checks the gs2 header (read_client_first_message) the same way for every user,
    the doomed exchange of an unknown one included: a client-first with flag `y` on a server
    that offers -PLUS is 08P01 "SCRAM channel binding negotiation error" whoever the user is.
    The gateway (proxy/auth.py) maps every ScramRefused of an unknown role to 28P01 before it
    looks at `channel_binding`, but a known role's to 08P01: one SASLInitialResponse, no
    password, tells a stranger whether a role exists in a database (and the 08P01 is not
    counted by auth_failures_per_minute, so the probe is not even rate limited)."""
    gateway.create_db("app1")
    downgraded = b"y,,n=,r=" + b"A" * 24  # supports binding, thinks the server does not
    wrong_type = b"p=tls-unique,,n=,r=" + b"A" * 24  # a binding type the server does not do
    for mechanism, first in (("SCRAM-SHA-256", downgraded), ("SCRAM-SHA-256-PLUS", wrong_type)):
        known = _answer_to_first(gateway, tls, "postgres", mechanism, first)
        unknown = _answer_to_first(gateway, tls, "ghost_role_xyz", mechanism, first)
        assert known.code == p.ErrorResponse("08P01", "").code, (mechanism, known)  # the probe ran
        assert (unknown.code, unknown.message) == (known.code, known.message), (
            f"{mechanism} with {first[:20]!r}: role postgres (exists) gets {known.code} "
            f"{known.message!r}, role ghost_role_xyz (does not) gets {unknown.code} {unknown.message!r}")


def test_strangers_without_a_password_cannot_keep_a_database_running(start_gateway, tls):
    """Scale to zero: an instance with no clients for idle_timeout is stopped. A stranger who
    knows only a database's id (its host name) and that role `postgres` exists (it always
    does) connects, sends a startup message and leaves, once every few seconds. Each such
    connection makes an early login (proxy/login.py EarlyLogin: a backend forked, the
    instance held as a client) that is dropped, and `InstanceManager.release` stamps
    `last_used` as if a client had used the database: the instance never becomes idle, is
    never stopped (nor saved, nor evictable under max_instances while it is held), though no
    one has logged in. No failed login is even recorded (the stranger sent no proof), so
    auth_failures_per_minute never limits it."""
    gateway = start_gateway(idle_timeout=3.0)
    gateway.create_db("app1")
    assert "app1" in gateway.running()
    started = gateway.gw.early_logins_started
    until = time.monotonic() + 9.0  # three idle_timeouts
    while time.monotonic() < until and "app1" in gateway.running():
        raw, _ = _sasl_client(gateway, tls, "postgres")  # no password is ever sent
        time.sleep(0.2)
        raw.close()
        time.sleep(0.8)
    assert gateway.gw.early_logins_started > started  # the stranger's connections did log in early
    assert "app1" not in gateway.running(), (
        f"{gateway.gw.early_logins_started - started} connections that never sent a password kept "
        "database app1 running for three times its idle_timeout")


def _salt(gateway, tls, user: str) -> str:
    """The salt in the server-first message a stranger gets for `user` of app1 (no password)."""
    raw, _ = _sasl_client(gateway, tls, user)
    try:
        raw.send(p.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=" + b"A" * 24).encode())
        first = raw.next_backend()
        assert isinstance(first, p.Authentication) and first.code == p.AUTH_SASL_CONTINUE, first
        return dict(kv.split("=", 1) for kv in first.data.decode().split(","))["s"]
    finally:
        raw.close()


def test_the_salt_of_a_role_that_does_not_exist_does_not_change_with_the_gateway_process(serve, tls):
    """A stranger asks for the server-first message of role R (no password needed) and gets
    R's salt: the real one, stored with its verifier, or for a role that does not exist a
    mock one, so that the two look alike. Postgres derives the mock salt from the user name
    and a nonce made at initdb: it never changes. The gateway keyed it with a key made per
    process (proxy/auth.py): every restart, every worker (`--workers`) and every gateway of a
    fleet answered another salt for a role that does not exist, the same salt for one that
    does. Asking twice, across a deploy or through two gateways of the fleet, told which
    roles exist."""
    import psycopg

    from ..e2e.test_shutdown import DEV_PASSWORD
    from ..support.harness import conninfo

    salts = []
    for _ in range(2):  # two gateway processes, one after the other, on one data root
        gp = serve()
        with psycopg.connect(conninfo(gp.port, tls["ca"], "app1", password=DEV_PASSWORD)):
            pass  # development mode makes app1 at the first login
        salts.append((_salt(gp, tls, "ghost_role_xyz"), _salt(gp, tls, "postgres")))
        gp.proc.terminate()
        assert gp.wait_exit(30) == 0, gp.log()
    (ghost1, real1), (ghost2, real2) = salts
    assert real1 == real2 and len(ghost1) >= 16, salts  # a stored salt; a mock was answered
    assert ghost1 != real1, salts
    assert ghost1 == ghost2, (
        f"two gateway processes answer two salts for a role that does not exist ({ghost1}, {ghost2}); "
        "a real role's salt is stored, the same from every process")


def test_a_role_valid_until_infinity_logs_in_and_does_not_break_the_role_reads(gateway, tls):
    """`VALID UNTIL 'infinity'` is Postgres' documented "never expires" (and what many tools
    write). psycopg cannot load an infinite timestamptz into a datetime (DataError "timestamp
    too large"), and the role reader (gateway/compute/dbroles.py from_rows, ROLE_QUERY /
    ROLES_NAMED_QUERY) reads rolvaliduntil with the default loader: such a role never logs in
    through the gateway (28P01 with the right password, where Postgres lets it in), and once
    one exists every whole read of the database's roles fails ("reading roles from running
    ... failed; using saved metadata", "could not save roles ... before stopping"). A tenant
    (or its migration tool) doing this freezes the gateway's view of its roles: a role made
    afterwards is refused even though it exists (and the roles saved at a stop stay stale)."""
    import psycopg

    from ..support.harness import conninfo

    gateway.create_db("app1")
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "app1"), autocommit=True) as tenant:
        tenant.execute("create role forever login password 'forever-pw-1234' valid until 'infinity'")
        assert tenant.execute("select rolvaliduntil::text from pg_authid where rolname = 'forever'"
                              ).fetchone() == ("infinity",)  # the role is there, as Postgres has it
    gateway.call(lambda: gateway.gw.instances.stop("app1"))  # saves the roles; the next login reads all
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "app1"), autocommit=True) as tenant:
        tenant.execute("create role later login password 'later-pw-1234'")
    for user, password in (("later", "later-pw-1234"), ("forever", "forever-pw-1234")):
        try:
            with psycopg.connect(conninfo(gateway.port, tls["ca"], "app1", user=user, password=password)) as c:
                assert c.execute("select current_user").fetchone() == (user,)
        except psycopg.OperationalError as e:
            raise AssertionError(f"role {user} with its right password is refused: {e}") from None


def test_connections_over_the_per_ip_cap_are_not_held_without_bound(start_gateway):
    """max_connections_per_ip is the defence against one address opening sockets without
    bound (each is a file descriptor, TLS state and a task in the gateway). A client over the
    cap is admitted anyway, uncounted (server.py `_admitted`/`_handle_client`: the refusal
    is told only after TLS and the startup message), and held like any other for up to
    handshake_timeout in the opening plus handshake_timeout in the session. So the cap
    bounds nothing: one address that opens connections and sends nothing holds as many
    sockets as it opens (about 20 s each by default), until the gateway runs out of file
    descriptors and fails every tenant (accept, backend sockets, data files)."""
    import socket

    gateway = start_gateway(max_connections_per_ip=2, handshake_timeout=10.0)
    n = 200
    socks = [socket.create_connection(("127.0.0.1", gateway.port), timeout=10) for _ in range(n)]
    try:
        time.sleep(1.5)
        held = 0
        for s in socks:
            s.setblocking(False)
            try:
                held += s.recv(1) != b""  # data would be a (premature) answer: not held silently
            except BlockingIOError:
                held += 1  # still open, nothing said: the gateway holds it
            except OSError:
                pass  # reset: closed
        tasks = len(gateway.gw.sessions)
        assert held <= 20, (
            f"with max_connections_per_ip = 2, one address holds {held} of {n} silent connections "
            f"open after 1.5 s ({tasks} gateway tasks)")
    finally:
        for s in socks:
            s.close()


def test_a_second_gssenc_request_is_not_answered_again(gateway):
    """Postgres answers one GSSENCRequest (and one SSLRequest) per connection; a second one is
    "unsupported frontend protocol 1234.5680" and the connection ends. The gateway's opening
    loop (server.py `_open`: `continue` after answering N) answers any number: one connection
    that pipelines 8-byte GSSENCRequests keeps the event loop busy for its whole
    handshake_timeout (about 44 us of gateway CPU per request here: 100,000 requests, 800 KB,
    cost 4.4 s of the loop every tenant shares)."""
    import socket

    n = 1000
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(p.GSSENCRequest().encode() * n)
        answers = b""
        try:
            while len(answers) < n:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answers += chunk
        except (socket.timeout, ConnectionError):
            pass
    assert answers[:1] == b"N", answers[:20]  # the first one is declined, as Postgres does
    # then an ErrorResponse or the end of the connection, not another N
    assert answers[1:2] != b"N", f"{len(answers) - len(answers.lstrip(b'N'))} of {n} GSSENCRequests on one connection were answered N"


def test_a_plain_client_cannot_forge_the_gateways_tls_settings(start_gateway):
    """README: pgsni.* settings are "set by the gateway after the client's own parameters, so a
    client cannot forge them at login". Startup parameters named pgsni.* are dropped
    (session.py `_route`), but `options` pass through untouched, and for a client without
    TLS (require_tls = false) the gateway sets only pgsni.client_addr, client_port and tls
    (context.py ClientInfo.settings): `-c pgsni.tls_version=... -c pgsni.server_name=...`
    in options then reads, in the session, as if the gateway had said so."""
    from ..support.harness import TEST_PASSWORD

    gateway = start_gateway(require_tls=False)
    gateway.create_db("app1")
    raw = RawClient(gateway.port)
    try:
        raw.startup({"user": "postgres", "database": "postgres",
                     "options": "endpoint=app1 -c pgsni.tls_version=TLSv1.3 -c pgsni.server_name=bank.example"})
        raw.scram("postgres", TEST_PASSWORD)
        while not isinstance(raw.next_backend(), p.ReadyForQuery):
            pass
        (row,) = raw.rows("select current_setting('pgsni.tls'), current_setting('pgsni.tls_version', true), "
                          "current_setting('pgsni.server_name', true)")
        assert row[0] == "off", row  # logged in without TLS, and the gateway said so
        assert row[1:] in ([None, None], ["", ""]), f"a plain client set the gateway's TLS settings: {row}"
    finally:
        raw.close()
