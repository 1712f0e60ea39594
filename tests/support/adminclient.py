"""A tiny blocking HTTP client for the admin API in tests (urllib: no extra dependency)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gateway import admintoken


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class AdminClient:
    def __init__(self, port: int, token: str | None = None, *, token_file: Path | None = None) -> None:
        """`token_file`: where a gateway without admin_token generated its token (read at each
        request: a gateway process may write it after this client is made)."""
        self.base = f"http://127.0.0.1:{port}"
        self._token, self.token_file = token, token_file

    @classmethod
    def of(cls, settings, port: int | None = None) -> "AdminClient":
        """A client of the gateway of `settings` with its token: admin_token, or the one it
        generates into its data root (where `pgsni` commands find it)."""
        return cls(port or settings.admin_port, settings.admin_token or None,
                   token_file=None if settings.admin_token else admintoken.token_path(settings))

    @property
    def token(self) -> str | None:
        if self._token is None and self.token_file is not None and self.token_file.exists():
            return self.token_file.read_text().strip()
        return self._token

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                raw: bytes | None = None, timeout: float = 60) -> Reply:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        token = token if token is not None else self.token
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return Reply(resp.status, dict(resp.headers), resp.read())
        except urllib.error.HTTPError as e:
            return Reply(e.code, dict(e.headers), e.read())

    def get(self, path: str, **kw) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw) -> Reply:
        return self.request("POST", path, body, **kw)

    def delete(self, path: str, **kw) -> Reply:
        return self.request("DELETE", path, **kw)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics as {(name, sorted labels): value}."""
        reply = self.get("/metrics")
        assert reply.status == 200, reply.body
        out = {}
        for family in text_string_to_metric_families(reply.body.decode()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)
