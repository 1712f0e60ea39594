"""Log output: one JSON object per line (for collectors), or readable text with the same
fields as key=value (for people). `log_format = auto` picks JSON unless stderr is a terminal.

Structured fields travel as `extra=` on the log call (see the per-connection line in
gateway/proxy/session.py); both formatters print every such field."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from typing import Any, TextIO

# attributes every LogRecord has; anything else on a record came in through `extra=`
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _iso(created: float) -> str:
    return dt.datetime.fromtimestamp(created, dt.timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


class JSONFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", ...extra fields, "exception"?} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": _iso(record.created), "level": record.levelname,
                               "logger": record.name, "message": record.getMessage()}
        for key, value in extra_fields(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # json.dumps escapes newlines, so one record is always one line
        return json.dumps(out, default=str)


# control characters a terminal acts on (ESC opens OSC and CSI sequences that retitle the
# window, move the cursor, erase lines, write the clipboard; CR overwrites a line), C1 included;
# newline and tab stay (tracebacks)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` for a terminal: its control characters (but newline and tab) written as `\\xNN`.
    What clients, tenants and dumps say reaches log lines and CLI errors: none of it may
    steer the operator's terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...`"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = printable(super().format(record))
        fields = extra_fields(record)
        if not fields:
            return text
        head, sep, tail = text.partition("\n")  # fields go on the message line, before a traceback
        return head + "".join(f" {k}={_text_value(v)}" for k, v in fields.items()) + sep + tail


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    if not text or any(c.isspace() or c in "\"=" or not c.isprintable() for c in text):
        return json.dumps(text)  # escapes control characters (and all that is not ASCII)
    return text


def wants_json(log_format: str, stream: TextIO) -> bool:
    if log_format == "auto":
        isatty = getattr(stream, "isatty", None)
        return not (isatty is not None and isatty())
    return log_format == "json"


def setup(level: str = "INFO", log_format: str = "auto", stream: TextIO | None = None) -> logging.Handler:
    """Send all logs to `stream` (stderr) in the chosen format, replacing earlier handlers."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter() if wants_json(log_format, stream) else TextFormatter())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler],
                        force=True)
    return handler
