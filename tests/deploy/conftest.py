"""Helpers for the deployment files (docker/, compose.yaml, fly.toml): a small Dockerfile
parser, the settings' environment names, the documented entrypoint variables, the entrypoint
run with a stub in place of pgsni, the image's health check command, and the lease timing
check the gateway makes at start."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from gateway.config import ENV_PREFIX, Settings
from storage.factory import retry_budget
from storage.leases import check_timing, default_margin

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
ENTRYPOINT = DOCKER / "entrypoint.sh"
PGSNI = Path(sys.executable).parent / "pgsni"


def setting_env_names() -> set[str]:
    """PGSNI_* variables that `gateway.config.load` reads (plus PGSNI_CONFIG)."""
    return {ENV_PREFIX + f.name.upper() for f in fields(Settings)} | {ENV_PREFIX + "CONFIG"}


def setting_default(name: str):
    f = {f.name: f for f in fields(Settings)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/RUN, or None for shell form."""
        text = self.args.strip()
        if text.startswith("["):
            return json.loads(text)
        return None

    def flags_and_rest(self) -> tuple[dict[str, str], list[str]]:
        """`--from=build a b` -> ({"from": "build"}, ["a", "b"]) for COPY/ADD."""
        words = shlex.split(self.args)
        flags = {}
        while words and words[0].startswith("--"):
            k, _, v = words.pop(0)[2:].partition("=")
            flags[k] = v
        return flags, words


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for i in self.all("ENV"):
            for word in shlex.split(i.args):
                k, _, v = word.partition("=")
                out[k] = v
        return out


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages). Joins continuation lines, drops comments, resolves
    ${ARG} in FROM lines. Enough for our own Dockerfile, not a general parser."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append((start, buf + stripped))
        buf = ""
    assert not buf, f"{path}: dangling line continuation at line {start}"

    args: dict[str, str] = {}
    stages: list[Stage] = []
    for n, text in logical:
        keyword, _, rest = text.partition(" ")
        ins = Instruction(keyword.upper(), rest.strip(), n)
        if ins.keyword == "ARG" and not stages:
            k, _, v = ins.args.partition("=")
            args[k] = v
        elif ins.keyword == "FROM":
            words = ins.args.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, name))
        else:
            assert stages, f"{path}:{n}: {ins.keyword} before the first FROM"
            stages[-1].instructions.append(ins)
    return args, stages


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether a context path is left out by .dockerignore patterns (Docker's rules: the last
    matching pattern wins, `!` re-includes, a pattern matching a parent directory matches
    everything under it, `*` stays within one path segment, `**` spans any number)."""
    def regex(p: str) -> re.Pattern:
        out, i = "", 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            elif p[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif p[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(p[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        p = raw.strip()
        if not p or p.startswith("#"):
            continue
        negate = p.startswith("!")
        p = p[1:] if negate else p
        rx = regex(p.strip("/"))
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return excluded


def healthcheck_argv(stage: Stage) -> list[str]:
    """The command of a stage's HEALTHCHECK (exec form)."""
    (hc,) = stage.all("HEALTHCHECK")
    cmd = re.search(r"CMD (\[.*\])", hc.args)
    assert cmd, hc.args
    return json.loads(cmd.group(1))


def image_healthcheck_here() -> list[str]:
    """The image's HEALTHCHECK command with its paths mapped to this checkout, to run it as
    the container would: with the container's environment, not the entrypoint's."""
    _, stages = parse_dockerfile(DOCKER / "Dockerfile")
    here = {"/opt/pgsni/bin/python": sys.executable}
    return [here.get(a, a.replace("/opt/pgsni/docker/", f"{DOCKER}/")) for a in healthcheck_argv(stages[-1])]


def check_lease_timing(settings: Settings) -> None:
    """LeaseTimingError where the gateway would refuse to start with these settings' lease
    and storage retries (gateway/app.py makes the same check)."""
    assert settings.lease_seconds > 0, "gateways find each other by their heartbeats"
    check_timing(settings.lease_seconds, default_margin(settings.lease_seconds), retry_budget(settings))


def documented_in_deploy_doc(name: str) -> bool:
    return re.search(rf"(?<![A-Z0-9_]){re.escape(name)}(?![A-Z0-9_])", DEPLOY_DOC.read_text()) is not None


def entrypoint_vars() -> set[str]:
    """Environment variables docker/entrypoint.sh reads: upper-case names expanded as $NAME
    or ${NAME...} (its own variables are lower-case)."""
    text = (DOCKER / "entrypoint.sh").read_text()
    code = "\n".join(line.split(" # ", 1)[0] for line in text.splitlines()
                     if not line.lstrip().startswith("#"))
    return set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", code))


def base_env(**extra: str) -> dict[str, str]:
    """A clean environment: no PGSNI_*/AWS_*/FLY_* from the test process leaks in."""
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("PGSNI_", "AWS_", "FLY_")) and k not in ("BUCKET_NAME", "TMPDIR")}
    return keep | extra


class EntrypointStub:
    """docker/entrypoint.sh run for real with a stub in place of pgsni (PGSNI_BIN): `certs ...`
    runs the real pgsni, `serve ...` records its argv and environment."""

    def __init__(self, tmp_path: Path) -> None:
        self.out = tmp_path / "stub-out"
        self.out.mkdir()
        self.cwd = tmp_path
        self.path = tmp_path / "pgsni-stub"
        self.path.write_text(f"""#!/bin/sh
if [ "$1" = certs ]; then exec {PGSNI} "$@"; fi
printf '%s\\n' "$@" > {self.out}/argv
env > {self.out}/env
""")
        self.path.chmod(0o755)

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        for f in self.out.iterdir():
            f.unlink()
        return subprocess.run([str(ENTRYPOINT), *args], env=base_env(PGSNI_BIN=str(self.path), **env),
                              capture_output=True, text=True, timeout=60, cwd=self.cwd)

    @property
    def served(self) -> bool:
        return (self.out / "argv").exists()

    @property
    def argv(self) -> list[str]:
        return (self.out / "argv").read_text().splitlines()

    @property
    def env(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in (self.out / "env").read_text().splitlines() if "=" in line)


def wait_listening(proc, port: int, log: Path, what: str, timeout: float = 120) -> None:
    """Wait until `proc` (a ./dev command writing to `log`) accepts connections on `port`;
    fail with its log if it exits first."""
    import socket

    from ..support.harness import wait_until

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_until(up, timeout=timeout, what=what)
