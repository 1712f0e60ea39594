"""/v1 of the admin API: the database lifecycle, mirroring the CLI, on top of
gateway/ops/operations.py (`Ops` over the running gateway's catalog, storage and instances).
OperationError kinds become HTTP statuses (invalid 400, not_found 404, conflict and busy 409,
unavailable 503); bodies are JSON both ways. The OpenAPI document is gateway/admin/openapi.json."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.ops.operations import Ops
from gateway.ops.results import OperationError

from . import data as admin_data
from .view import GatewayView

log = logging.getLogger("pgsni.admin")

OPENAPI_PATH = Path(__file__).with_name("openapi.json")
_TRUE, _FALSE = ("1", "true", "yes"), ("", "0", "false", "no")


def _error(e: OperationError) -> web.Response:
    return web.json_response(e.to_dict(), status=e.status)


def _flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "").lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise OperationError("invalid", f"query parameter {name}={raw!r} is not true or false")


def _time(text: str | None) -> dt.datetime | None:
    """An ISO 8601 time with its zone (a restore's or fork's target), or None."""
    if text is None:
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise OperationError("invalid", f"time {text!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise OperationError("invalid", "the time needs a time zone (e.g. 2026-12-03T12:00:00Z)")
    return when


async def _body(request: web.Request, fields: dict[str, bool],
                objects: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """The JSON object in the body; `fields` maps each allowed field to whether it is
    required. Every value is a string, but those named in `objects` (checked by their user)."""
    if not request.can_read_body:
        data: Any = {}
    else:
        try:
            data = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise OperationError("invalid", "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise OperationError("invalid", "the request body must be a JSON object")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise OperationError("invalid", f"unknown field(s): {', '.join(unknown)}",
                             hint=f"Allowed: {', '.join(fields)}.")
    for name, required in fields.items():
        if required and name not in data:
            raise OperationError("invalid", f"field {name!r} is required")
        if name in data and data[name] is not None and not isinstance(data[name], str) \
                and name not in objects:
            raise OperationError("invalid", f"field {name!r} must be a string")
    return data


def _result(result: Any, status: int = 200) -> web.Response:
    if isinstance(result, list):
        return web.json_response([r.to_dict() for r in result], status=status)
    if getattr(result, "dry_run", False):
        status = 200  # a plan: nothing was created
    return web.json_response(result.to_dict(), status=status)


def add_routes(app: web.Application, gw: GatewayView) -> None:
    ops = Ops(gw.settings, gw.catalog, gw.databases, gw.instances)

    def handler(fn):
        async def wrapped(request: web.Request) -> web.Response:
            try:
                return await fn(request)
            except OperationError as e:
                return _error(e)
            except web.HTTPException:
                raise
            except Exception:
                log.exception("admin request %s %s failed", request.method, request.path)
                return _error(OperationError("failed", "internal error in the gateway",
                                             hint="The gateway log has the details."))
        return wrapped

    async def create(request: web.Request) -> web.Response:
        body = await _body(request, {"id": True, "password": False, "source": False,
                                     "sha256": False, "owner": False, "pg": False})
        result = await ops.create(body["id"], password=body.get("password"), source=body.get("source"),
                                  sha256=body.get("sha256"), owner=body.get("owner"),
                                  major=body.get("pg"), dry_run=_flag(request, "dry_run"))
        return _result(result, 201)

    async def listing(request: web.Request) -> web.Response:
        return _result(await ops.list())

    async def info(request: web.Request) -> web.Response:
        return _result(await ops.info(request.match_info["id"]))

    async def delete(request: web.Request) -> web.Response:
        return _result(await ops.delete(request.match_info["id"], force=_flag(request, "force"),
                                        dry_run=_flag(request, "dry_run")))

    async def fork(request: web.Request) -> web.Response:
        body = await _body(request, {"id": True, "version": False, "time": False, "lsn": False})
        result = await ops.fork(request.match_info["id"], body["id"], body.get("version"),
                                time=_time(body.get("time")), lsn=body.get("lsn"),
                                dry_run=_flag(request, "dry_run"))
        return _result(result, 201)

    async def snapshot(request: web.Request) -> web.Response:
        return _result(await ops.snapshot(request.match_info["id"], force=_flag(request, "force"),
                                          stop=_flag(request, "stop"), dry_run=_flag(request, "dry_run")))

    async def versions(request: web.Request) -> web.Response:
        db_id = request.match_info["id"]
        found = await ops.versions(db_id)
        if not found and not await ops._exists(db_id):
            raise OperationError("not_found", f'database "{db_id}" does not exist')
        return _result(found)

    async def restore(request: web.Request) -> web.Response:
        body = await _body(request, {"version": False, "time": False, "lsn": False})
        return _result(await ops.restore(request.match_info["id"], body.get("version"),
                                         time=_time(body.get("time")), lsn=body.get("lsn"),
                                         force=_flag(request, "force"),
                                         dry_run=_flag(request, "dry_run")))

    async def verify(request: web.Request) -> web.Response:
        return _result(await ops.verify(request.match_info["id"], dry_run=_flag(request, "dry_run")))

    async def upgrade(request: web.Request) -> web.Response:
        body = await _body(request, {"to": True})
        return _result(await ops.upgrade(request.match_info["id"], body["to"], force=_flag(request, "force"),
                                         dry_run=_flag(request, "dry_run")))

    async def secure(request: web.Request) -> web.Response:
        body = await _body(request, {"drop_untrusted": False}, objects={"drop_untrusted"})
        drop = body.get("drop_untrusted", False)
        if not isinstance(drop, bool):
            raise OperationError("invalid", "field 'drop_untrusted' must be true or false")
        return _result(await ops.secure(request.match_info["id"], drop_untrusted=drop,
                                        dry_run=_flag(request, "dry_run")))

    async def password(request: web.Request) -> web.Response:
        body = await _body(request, {"role": False, "password": False})
        return _result(await ops.set_password(request.match_info["id"], body.get("role") or "postgres",
                                              body.get("password"), dry_run=_flag(request, "dry_run")))

    async def dump(request: web.Request) -> web.StreamResponse:
        q = request.query
        extra = ["--no-owner"] * _flag(request, "no_owner") + \
            ["--no-privileges"] * _flag(request, "no_privileges")
        return await admin_data.dump(gw, ops, request, request.match_info["id"],
                                     q.get("format", "custom"), q.get("database", "postgres"), extra)

    async def migrate(request: web.Request) -> web.Response:
        body = await _body(request, {"migrations": True, "database": False}, objects={"migrations"})
        return web.json_response(await admin_data.migrate(
            gw, ops, request.match_info["id"], body["migrations"], body.get("database") or "postgres",
            dry_run=_flag(request, "dry_run")))

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(json.loads(OPENAPI_PATH.read_text()))

    r = app.router
    r.add_post("/v1/databases", handler(create))
    r.add_get("/v1/databases", handler(listing), allow_head=False)
    r.add_get("/v1/databases/{id}", handler(info), allow_head=False)
    r.add_delete("/v1/databases/{id}", handler(delete))
    r.add_post("/v1/databases/{id}/fork", handler(fork))
    r.add_post("/v1/databases/{id}/snapshot", handler(snapshot))
    r.add_get("/v1/databases/{id}/versions", handler(versions), allow_head=False)
    r.add_post("/v1/databases/{id}/restore", handler(restore))
    r.add_post("/v1/databases/{id}/verify", handler(verify))
    r.add_post("/v1/databases/{id}/password", handler(password))
    r.add_post("/v1/databases/{id}/secure", handler(secure))
    r.add_post("/v1/databases/{id}/upgrade", handler(upgrade))
    r.add_get("/v1/databases/{id}/dump", handler(dump), allow_head=False)
    r.add_post("/v1/databases/{id}/migrate", handler(migrate))
    r.add_get("/v1/openapi.json", handler(openapi), allow_head=False)
