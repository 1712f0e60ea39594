"""Log formatting: one JSON object per line with extra fields, or text with key=value, and
`auto` choosing by whether the stream is a terminal."""

from __future__ import annotations

import io
import json
import logging
import os

import pytest

from gateway import logs


def _record(msg="hello %s", args=("world",), exc_info=None, **extra) -> logging.LogRecord:
    record = logging.getLogger("pgsni.test").makeRecord(
        "pgsni.test", logging.WARNING, __file__, 1, msg, args, exc_info, extra=extra or None)
    return record


def test_json_line_has_the_basics_and_the_extra_fields():
    line = logs.JSONFormatter().format(_record(db="app1", bytes_in=12, tls=True, wake_ms=None))
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["message"] == "hello world"
    assert obj["level"] == "WARNING" and obj["logger"] == "pgsni.test"
    assert obj["time"].endswith("Z") and obj["time"][:2] == "20"
    assert obj["db"] == "app1" and obj["bytes_in"] == 12 and obj["tls"] is True and obj["wake_ms"] is None
    assert "args" not in obj and "msg" not in obj and "levelno" not in obj


def test_json_keeps_a_traceback_on_one_line():
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        import sys
        record = _record("failed", (), exc_info=sys.exc_info())
    line = logs.JSONFormatter().format(record)
    assert "\n" not in line
    assert "ValueError: bad" in json.loads(line)["exception"]


def test_json_survives_values_json_does_not_know():
    obj = json.loads(logs.JSONFormatter().format(_record(path=logs, n=3)))
    assert "gateway.logs" in obj["path"] and obj["n"] == 3


def test_text_appends_fields_as_key_value():
    line = logs.TextFormatter().format(_record(db="app1", outcome="client left", user=None))
    assert "WARNING pgsni.test: hello world" in line
    assert line.endswith(' db=app1 outcome="client left" user=-')


def test_auto_is_json_unless_the_stream_is_a_terminal():
    assert logs.wants_json("auto", io.StringIO())
    assert not logs.wants_json("text", io.StringIO())
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert not logs.wants_json("auto", tty)
            assert logs.wants_json("json", tty)
    finally:
        os.close(master)
        os.close(slave)


@pytest.fixture
def restore_root_logging():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield
    root.handlers[:], _ = saved[0], root.setLevel(saved[1])


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_setup_routes_every_logger_through_the_format(restore_root_logging, fmt):
    out = io.StringIO()
    logs.setup("INFO", fmt, out)
    logging.getLogger("pgsni.x").info("started", extra={"port": 5432})
    logging.getLogger("pgsni.x").debug("hidden")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    if fmt == "json":
        assert json.loads(lines[0])["port"] == 5432
    else:
        assert lines[0].endswith("pgsni.x: started port=5432")
