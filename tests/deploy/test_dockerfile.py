"""docker/Dockerfile, checked without a Docker engine: stages and base images, what the
runtime installs, PID 1, the health check, the entrypoint, and that every path it copies
exists and is in the build context (.dockerignore)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

from .conftest import (DOCKER, ROOT, dockerignore_excludes, entrypoint_vars, healthcheck_argv,
                       parse_dockerfile, setting_default, setting_env_names)

DOCKERFILE = DOCKER / "Dockerfile"


@pytest.fixture(scope="module")
def parsed():
    return parse_dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def build(parsed):
    return parsed[1][0]


@pytest.fixture(scope="module")
def runtime(parsed):
    return parsed[1][-1]


def _run_text(stage) -> str:
    return "\n".join(i.args for i in stage.all("RUN"))


def top_level_packages(project: dict) -> set[str]:
    """The top-level packages pyproject.toml's `packages.find` includes ("gateway*" → gateway)."""
    found = {name.rstrip("*").split(".")[0]
             for name in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert found and all((ROOT / name / "__init__.py").is_file() for name in found), found
    return found


def test_multi_stage_on_python_311_slim_bookworm(parsed):
    _, stages = parsed
    assert len(stages) >= 2, "a build stage and a runtime stage"
    assert stages[0].name == "build"
    for s in stages:
        assert s.image == "python:3.11-slim-bookworm", s.image
    assert stages[-1].name == "runtime"


def test_build_stage_installs_pgsni_from_the_pinned_constraints(build):
    run = _run_text(build)
    assert re.search(r"pip install -c constraints\.txt \.(\s|$)", run), run
    assert "[test]" not in run, "test extras do not belong in the image"
    # development keys are removed before anything is installed from the tree
    assert run.index("rm -rf certs/dev") < run.index("pip install")
    copied = {words[-1].rstrip("/").removeprefix("./") for _, words in
              (c.flags_and_rest() for c in build.all("COPY"))}
    copied |= {w for _, words in (c.flags_and_rest() for c in build.all("COPY"))
               for w in words[:-1]}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = top_level_packages(project) | {
        project["project"]["readme"], "pyproject.toml", "constraints.txt"}
    missing = needed - copied
    assert not missing, f"the build stage does not copy {sorted(missing)} (pyproject.toml needs them)"


def test_runtime_has_postgres_18_with_pgvector_and_15_s3fs_and_tini_but_no_main_cluster(runtime):
    run = _run_text(runtime)
    installs = re.findall(r"apt-get install[^&]*", run)
    assert installs, run
    packages = {word for install in installs for word in install.split()}
    assert {"postgresql-18", "postgresql-18-pgvector", "postgresql-15", "s3fs", "tini"} <= packages, packages
    # 18 comes from the PostgreSQL project's signed repository, added before it is installed
    assert run.index("apt.postgresql.org.sh -y") < run.index("postgresql-18")
    assert runtime.env()["PGSNI_PG_BINDIR"] == "/usr/lib/postgresql/18/bin,/usr/lib/postgresql/15/bin"
    assert "--no-install-recommends" in packages
    assert "create_main_cluster = false" in run
    assert "rm -rf /var/lib/apt/lists/*" in run
    # the venv comes from the build stage, not from pip in the runtime
    assert any(c.flags_and_rest()[0].get("from") == "build" for c in runtime.all("COPY"))
    assert "pip install" not in run


def test_postgres_runs_as_an_unprivileged_user(runtime):
    env = runtime.env()
    assert env["PGSNI_PG_USER"] == "postgres"
    assert "id postgres" in _run_text(runtime), "the build checks that the user exists"
    users = [u.args.split(":")[0] for u in runtime.all("USER")]
    assert not users or users[-1] not in ("root", "0"), "never USER root at the end"


def test_tini_is_pid_1_and_runs_the_entrypoint(runtime):
    (entry,) = runtime.all("ENTRYPOINT")
    argv = entry.exec_form()
    assert argv is not None, "exec form, so tini is PID 1 and gets the signals"
    assert argv[0] == "/usr/bin/tini" and argv[1] == "--"
    assert argv[2] == "/opt/pgsni/docker/entrypoint.sh"
    (cmd,) = runtime.all("CMD")
    assert cmd.exec_form() == ["serve"]
    (stop,) = runtime.all("STOPSIGNAL")
    assert stop.args == "SIGTERM"


def _copied_into(runtime, target_dir: str) -> set[str]:
    names = set()
    for c in runtime.all("COPY"):
        flags, words = c.flags_and_rest()
        if "from" not in flags and words[-1].rstrip("/") == target_dir:
            names |= {w.rsplit("/", 1)[-1] for w in words[:-1]}
    return names


def test_entrypoint_and_healthcheck_are_copied_where_they_are_used(runtime):
    in_image = _copied_into(runtime, "/opt/pgsni/docker")
    assert {"entrypoint.sh", "healthcheck.py"} <= in_image
    (hc,) = runtime.all("HEALTHCHECK")
    assert "--interval=" in hc.args and "--start-period=" in hc.args
    # through the entrypoint, so that it loads the settings the gateway was given
    # (BUCKET_NAME's mapping, the advertised address on Fly.io: test_entrypoint.py)
    assert healthcheck_argv(runtime) == ["/opt/pgsni/docker/entrypoint.sh", "/opt/pgsni/bin/python",
                                         "/opt/pgsni/docker/healthcheck.py"]


def test_every_copied_path_exists_and_is_in_the_build_context(parsed):
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    _, stages = parsed
    checked = 0
    for stage in stages:
        for c in stage.all("COPY"):
            flags, words = c.flags_and_rest()
            if "from" in flags:
                continue
            for src in words[:-1]:
                path = ROOT / src
                assert path.exists(), f"Dockerfile line {c.line}: COPY {src}: no such path"
                assert not dockerignore_excludes(ignore, src), f"COPY {src} is excluded by .dockerignore"
                checked += 1
    assert checked >= 6
    # and what must never be sent to a builder is not
    for secret in ("certs/dev/server-key.pem", "certs/dev/ca-key.pem", ".venv/bin/python",
                   ".pgsni/data/x", "gateway/__pycache__/config.cpython-311.pyc"):
        assert dockerignore_excludes(ignore, secret), f"{secret} would be in the build context"


def test_exposed_ports_are_the_configured_ones(runtime):
    env = runtime.env()
    exposed = {p.split("/")[0] for e in runtime.all("EXPOSE") for p in e.args.split()}
    assert env["PGSNI_LISTEN_PORT"] in exposed
    assert env["PGSNI_ADMIN_PORT"] in exposed
    assert int(env["PGSNI_LISTEN_PORT"]) == setting_default("listen_port")
    assert int(env["PGSNI_ADMIN_PORT"]) == setting_default("admin_port")
    assert env["PGSNI_LISTEN_HOST"] == "0.0.0.0", "reachable from outside the container"


def test_image_environment_names_are_real(runtime):
    env = runtime.env()
    known = setting_env_names() | entrypoint_vars()
    unknown = {k for k in env if k.startswith("PGSNI_")} - known
    assert not unknown, f"ENV sets {sorted(unknown)}, which neither pgsni nor the entrypoint reads"
    assert env["PGSNI_DATA_ROOT"].startswith("/data/")
    (vol,) = runtime.all("VOLUME")
    assert "/data" in vol.args


@pytest.mark.slow
def test_build_stage_package_carries_every_file_the_runtime_needs(build, tmp_path):
    """Replay the build stage's COPY lines (through .dockerignore) and its `rm -rf certs/dev`,
    build the wheel that `pip install .` would install, and compare it with the source tree:
    a data file missing from package-data would break the image but not a dev checkout."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    ctx = tmp_path / "src"
    ctx.mkdir()
    for c in build.all("COPY"):
        flags, words = c.flags_and_rest()
        for src in words[:-1]:
            path = ROOT / src
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                if dockerignore_excludes(ignore, rel):
                    continue
                (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, ctx / rel)
    assert (ctx / "pyproject.toml").exists()
    shutil.rmtree(ctx / "certs" / "dev", ignore_errors=True)
    out = tmp_path / "wheel"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ctx)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("pgsni-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "pgsni = gateway.cli.main:main" in entry_points
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    expected = {p.relative_to(ROOT).as_posix()
                for pkg in top_level_packages(project)
                for p in (ROOT / pkg).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")
                and not p.relative_to(ROOT).as_posix().startswith("certs/dev/")}
    missing = expected - names
    assert not missing, f"the image would lack {sorted(missing)} (add them to package-data)"
    assert not any(n.startswith("certs/dev/") for n in names), "development keys in the package"
