"""The CLI's output helpers (gateway/cli/common.py) print what tenants name (roles, objects in
a `db secure` report, settings): their control characters never reach the operator's terminal
raw, and on a terminal their brackets are not taken for rich markup."""

from __future__ import annotations

import io
import sys

import click
import pytest

from gateway.cli import common

EVIL = "app\x1b]0;owned\x07\x1b[2K[bold red]x[/]"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def ctx():
    with click.Context(click.Command("t"), obj={}) as c:
        yield c


@pytest.mark.parametrize("tty", [False, True])
def test_table_cells_are_printed_inert(ctx, monkeypatch, tty):
    out = _Tty() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    common.table(ctx, "roles", ["name"], [[EVIL]])
    text = out.getvalue()  # on a terminal, rich styles its own title and header (SGR codes)
    assert "\x1b]" not in text and "\x1b[2K" not in text and "\x07" not in text, repr(text)
    assert tty or "\x1b" not in text
    assert "\\x1b]0;owned\\x07" in text and "[bold red]x[/]" in text  # shown as written, not obeyed


def test_lines_are_printed_inert(ctx, capsys):
    common.say(ctx, f"dropped {EVIL}")
    common.note(ctx, f"kept {EVIL}")
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err and "\\x1b]0;owned" in out and "\\x1b]0;owned" in err
