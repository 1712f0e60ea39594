"""What the admin API reads of the running gateway (gateway/app.py's Gateway is one), so that
it depends on the pieces it uses, not on the process that assembles them."""

from __future__ import annotations

import ssl
from typing import Protocol

from gateway.compute.instances import InstanceManager
from gateway.config import Settings
from gateway.metrics import Metrics
from storage.backend import Backend
from storage.cache import Databases
from storage.local import LocalCatalog


class GatewayView(Protocol):
    settings: Settings
    catalog: LocalCatalog
    databases: Databases
    instances: InstanceManager
    backend: Backend
    metrics: Metrics

    @property
    def listening(self) -> bool: ...

    @property
    def shutting_down(self) -> bool: ...

    @property
    def ssl_context(self) -> ssl.SSLContext | None: ...
