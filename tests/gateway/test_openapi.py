"""The admin API's OpenAPI document: valid OpenAPI 3.1, the same routes as the aiohttp app
(no more, no fewer), and real answers that match its schemas."""

from __future__ import annotations

import json

import pytest
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

from gateway.admin.server import build_app
from gateway.admin.api import OPENAPI_PATH
from gateway.app import Gateway

from ..support.adminclient import AdminClient
from ..support.ports import free_port

METHODS = {"get", "post", "put", "delete", "patch", "head", "options"}


@pytest.fixture(scope="module")
def doc() -> dict:
    return json.loads(OPENAPI_PATH.read_text())


def test_document_is_valid_openapi_31(doc):
    assert doc["openapi"].startswith("3.1")
    validate(doc)  # raises on any violation


def test_every_route_is_documented_and_every_documented_route_exists(doc, make_settings):
    app = build_app(Gateway(make_settings()), "t0k")
    served = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()}
    documented = {(m, path) for path, item in doc["paths"].items() for m in item if m in METHODS}
    assert served == documented
    assert ("get", "/v1/openapi.json") in served and ("delete", "/v1/databases/{id}") in served


def test_only_health_and_ready_are_open(doc):
    open_ops = {path for path, item in doc["paths"].items()
                for m, op in item.items() if m in METHODS and op.get("security") == []}
    assert open_ops == {"/healthz", "/readyz"}
    assert doc["security"] == [{"bearer": []}]


def _schema(doc, path, method, status):
    content = doc["paths"][path][method]["responses"][status]
    if "$ref" in content:
        content = doc["components"]["responses"][content["$ref"].rsplit("/", 1)[1]]
    return content["content"]["application/json"]["schema"]


def _check(doc, path, method, reply, template=None):
    schema = {**_schema(doc, template or path, method, str(reply.status)),
              "components": doc["components"]}
    OAS31Validator(schema).validate(reply.json())


def test_real_answers_match_the_schemas(doc, start_gateway):
    gt = start_gateway(admin_port=free_port(), admin_token="t0k")
    admin = AdminClient(gt.settings.admin_port, "t0k")
    _check(doc, "/healthz", "get", admin.get("/healthz"))
    _check(doc, "/readyz", "get", admin.get("/readyz"))
    created = admin.post("/v1/databases", {"id": "app1"})
    _check(doc, "/v1/databases", "post", created)
    _check(doc, "/v1/databases", "post", admin.post("/v1/databases?dry_run=1", {"id": "app2"}))
    _check(doc, "/v1/databases", "post", admin.post("/v1/databases", {"id": "app1"}))  # 409
    _check(doc, "/v1/databases", "get", admin.get("/v1/databases"))
    _check(doc, "/v1/databases", "get", admin.get("/v1/databases", token="bad"))  # 401
    _check(doc, "/v1/databases/app1", "get", admin.get("/v1/databases/app1"), "/v1/databases/{id}")
    _check(doc, "/v1/databases/x", "get", admin.get("/v1/databases/x"), "/v1/databases/{id}")  # 404
    _check(doc, "/v1/databases/app1/versions", "get", admin.get("/v1/databases/app1/versions"),
           "/v1/databases/{id}/versions")
    _check(doc, "/v1/databases/app1/snapshot", "post", admin.post("/v1/databases/app1/snapshot"),
           "/v1/databases/{id}/snapshot")
    migrate = {"migrations": {"V1__t.sql": "create table t(x int);"}}
    _check(doc, "/v1/databases/app1/migrate", "post", admin.post("/v1/databases/app1/migrate", migrate),
           "/v1/databases/{id}/migrate")
    _check(doc, "/v1/databases/app1/migrate", "post", admin.post("/v1/databases/app1/migrate", {}),
           "/v1/databases/{id}/migrate")  # 400
    served = admin.get("/v1/openapi.json")
    assert served.status == 200 and served.json() == doc
