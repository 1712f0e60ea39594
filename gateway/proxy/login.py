"""The backend login of a session: on a running instance (`log_in`), waking it first and
waiting out its passing refusals (`wake_and_log_in`), or early, while the client is still
authenticating (`EarlyLogin`)."""

from __future__ import annotations

import asyncio
import logging
import time

from gateway import errors
from gateway.errors import GatewayError

from . import relay
from .context import ProxyContext

log = logging.getLogger("pgsni.session")


# pause between logins to a postmaster that refused one for now (57P03)
LOGIN_RETRY_PAUSE = 0.1


# at most this many backend sessions per database may be logged in ahead of their clients'
# authentication (made or being made, not yet used or dropped)
EARLY_LOGINS_PER_DB = 8


async def log_in(gw: ProxyContext, inst, params: dict[str, str], keys: asyncio.Future, *,
                 early: bool = False) -> relay.BackendSession:
    """The backend login on a held instance; if it fails or is cancelled, the instance is
    given back (relay.login closes its own connection). `early`: before the client has
    authenticated (counted in inst.early until it is taken or given back)."""
    try:
        return await relay.login(inst.socket_path, params, gw.settings.start_timeout, keys)
    except BaseException:
        if early:
            inst.early -= 1
        gw.instances.release(inst, used=not early)
        raise


async def wake_and_log_in(gw: ProxyContext, db_id: str, params: dict[str, str], keys: asyncio.Future):
    """(instance, when it was acquired, backend session), starting the instance if need be.
    Passing states of the instance are waited out, up to `start_timeout`, instead of failing
    the client: a postmaster that turns out to be exiting (its socket already gone) is replaced
    by a new one, and one that refuses logins for now (57P03: starting up, crash recovery after
    a backend crashed, shutting down; or a login closed as crash recovery begins) is asked
    again until it accepts, or exits and is replaced. Past the deadline the client gets the
    last refusal as it was."""
    create = gw.dev_role.verifier if gw.dev_role is not None else None
    deadline = time.monotonic() + gw.settings.start_timeout
    waited = False
    while True:
        inst = await gw.instances.acquire(db_id, create_verifier=create)
        acquired = time.monotonic()
        try:
            return inst, acquired, await log_in(gw, inst, params, keys)
        except relay.BackendUnreachable as e:
            if time.monotonic() >= deadline or not await gw.instances.exited(inst):
                raise
            log.warning("postgres for %s exited as a client logged in (%s); starting it again",
                        db_id, e.detail)
        except (relay.BackendRefused, relay.BackendClosed) as e:
            if not e.passing or time.monotonic() + LOGIN_RETRY_PAUSE >= deadline:
                raise
            if gw.shutting_down:
                raise errors.shutting_down() from None
            if not waited:
                waited = True
                log.warning("postgres for %s refused a login for now (%s); asking again until it "
                            "accepts (up to start_timeout)", db_id, e)
            await asyncio.sleep(LOGIN_RETRY_PAUSE)


class EarlyLogin:
    """One backend login started before its client authenticated: taken with `result()` once
    it has, or `drop()`ped (cancelled, or its backend session closed and the instance given
    back). Either frees its place under EARLY_LOGINS_PER_DB."""

    def __init__(self, gw: ProxyContext, db_id: str, params: dict[str, str], keys: asyncio.Future) -> None:
        self.gw, self.db_id = gw, db_id
        gw.early_logins[db_id] = gw.early_logins.get(db_id, 0) + 1
        gw.early_logins_started += 1
        self.task = asyncio.create_task(self._login(params, keys))
        self._held = True

    async def _login(self, params: dict[str, str], keys: asyncio.Future):
        """(instance, backend session) for a database running now, or None if it no longer
        is, could not be reached or refused the login for now (the session then logs in the
        usual way, which restarts an instance that died meanwhile and waits out a passing
        refusal). Any other refusal by the backend (BackendRefused) is the client's answer
        either way, so it is passed on."""
        inst = await self.gw.instances.acquire_running(self.db_id)
        if inst is None:
            return None
        try:
            return inst, await log_in(self.gw, inst, params, keys, early=True)
        except relay.BackendRefused as e:
            if e.passing:  # the session's own login waits it out
                return None
            raise
        except GatewayError as e:
            log.debug("early login to %s failed (%s); trying again after authentication", self.db_id, e)
            return None

    async def result(self):
        try:
            taken = await self.task
            if taken is not None:
                taken[0].early -= 1  # its client authenticated: a client like any other now
            return taken
        except asyncio.CancelledError:
            self.drop()
            raise
        finally:
            self._free()

    def drop(self) -> None:
        def cleanup(t: asyncio.Task) -> None:
            self._free()
            if t.cancelled() or t.exception() is not None or t.result() is None:
                return  # nothing was kept (and an exception is now retrieved)
            inst, backend = t.result()
            backend.conn.close()
            inst.early -= 1
            self.gw.instances.release(inst, used=False)
        self.task.cancel()
        self.task.add_done_callback(cleanup)

    def _free(self) -> None:
        if self._held:
            self._held = False
            left = self.gw.early_logins.get(self.db_id, 1) - 1
            if left > 0:
                self.gw.early_logins[self.db_id] = left
            else:
                self.gw.early_logins.pop(self.db_id, None)
