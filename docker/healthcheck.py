"""Container health check: exit 0 when the gateway is ready, 1 otherwise (the image's
HEALTHCHECK). Reads the settings the way `pgsni serve` does (PGSNI_* and PGSNI_CONFIG):
GET /readyz on the admin API, or, with admin_port = 0, a TCP connect to the listener."""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request

TIMEOUT = 4.0


def probe_host(host: str) -> str:
    """Where to reach a server bound to `host` from inside its own container."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def check(settings) -> str | None:
    """None when ready, else the reason."""
    if settings.admin_port:
        host = probe_host(settings.admin_host)
        url = f"http://{f'[{host}]' if ':' in host else host}:{settings.admin_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
                return None if r.status == 200 else f"{url} answered {r.status}"
        except urllib.error.HTTPError as e:
            return f"{url} answered {e.code}"
        except OSError as e:
            return f"{url}: {e}"
    host = probe_host(settings.listen_host)
    try:
        socket.create_connection((host, settings.listen_port), timeout=TIMEOUT).close()
    except OSError as e:
        return f"{host}:{settings.listen_port}: {e}"
    return None


def main() -> int:
    from gateway.config import ConfigError, load

    try:
        settings = load()
    except ConfigError as e:
        print(f"unhealthy: configuration: {e}", file=sys.stderr)
        return 1
    reason = check(settings)
    if reason:
        print(f"unhealthy: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
