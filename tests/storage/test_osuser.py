"""Directories for Postgres: created with safe modes, and planted paths refused."""

import os
import stat

import pytest

from storage.osuser import OSUserError, RunAs


@pytest.fixture
def run_as():
    return RunAs.resolve("postgres")


def test_make_dir_creates_a_private_directory(tmp_path, run_as):
    d = run_as.make_dir(tmp_path / "sockets")
    st = os.lstat(d)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == run_as.uid


def test_make_dir_refuses_a_planted_symlink(tmp_path, run_as):
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "sockets"
    link.symlink_to(target)
    with pytest.raises(OSUserError, match="not a directory owned"):
        run_as.make_dir(link)


def test_make_dir_refuses_a_directory_owned_by_someone_else(tmp_path, run_as):
    if os.geteuid() != 0:
        pytest.skip("needs root to create a directory owned by another user")
    d = tmp_path / "sockets"
    d.mkdir()
    os.chown(d, 65534, 65534)  # nobody
    with pytest.raises(OSUserError):
        run_as.make_dir(d)


def test_unreachable_data_root_is_explained(tmp_path, run_as):
    if not run_as.switches_user:
        pytest.skip("only matters when Postgres runs as another user")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    with pytest.raises(OSUserError, match="cannot enter"):
        run_as.check_reachable(locked / "data")


def test_a_data_root_whose_parents_do_not_exist_yet_is_reachable(run_as):
    """./dev serve on a fresh clone: <checkout>/.pgsni/data, with no .pgsni yet (the gateway
    makes it)."""
    from ..conftest import reachable_tmpdir

    checkout = reachable_tmpdir("pgsni-fresh-")
    try:
        run_as.check_reachable(checkout / ".pgsni" / "data")
    finally:
        checkout.rmdir()
