"""
scripts/install-deps installs what the agent needs, and with ``--test`` what the tests use
too; only what is missing, and nothing (not even apt's lists) when all is there. Run with
stand-ins for dpkg-query and apt-get on a PATH of their own, so that nothing is installed.
"""

import os
import pathlib
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.functional

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "install-deps"
RUNTIME = {"docker.io", "etcd-server", "etcd-client", "debootstrap", "curl", "ca-certificates", "python3-venv"}
TESTS = {"chromium", "prometheus", "docker-registry", "apache2-utils"}


def stand_ins(tmp_path, installed_packages=()):
    """A bin dir: apt-get noting its arguments, dpkg-query knowing ``installed_packages``, grep."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    known = " ".join(installed_packages)
    (bin_dir / "dpkg-query").write_text(
        "#!/bin/sh\nfor p in "
        + (known or "NONE")
        + '; do [ "$p" = "$3" ] && { printf "install ok installed"; exit 0; }; done\nexit 1\n'
    )
    for name in ("apt-get", "dpkg-query"):
        (bin_dir / name).chmod(0o755)
    os.symlink(shutil.which("grep"), bin_dir / "grep")
    return bin_dir, log


def run(*args, path):
    return subprocess.run(
        ["/bin/bash", str(SCRIPT), *args], capture_output=True, text=True, env={"PATH": path}, timeout=60
    )


def installed(log):
    """The packages ``apt-get install`` was asked for, or None when it was not called."""
    if not log.exists():
        return None
    lines = log.read_text().splitlines()
    assert lines[0].startswith("update"), lines
    return set(lines[1].split()) - {"install", "-y", "-q", "--no-install-recommends"}


def commands_found_in_sbin():
    # The script looks in /usr/sbin and /sbin too: what is there counts as installed.
    return {
        package
        for package, command in (("docker.io", "dockerd"), ("debootstrap", "debootstrap"))
        if any(os.access(os.path.join(d, command), os.X_OK) for d in ("/usr/sbin", "/sbin"))
    }


@pytest.mark.skipif(os.geteuid() != 0, reason="the script installs as root only")
def test_the_agents_packages_alone_by_default(tmp_path):
    bin_dir, log = stand_ins(tmp_path)
    done = run(path=str(bin_dir))
    assert done.returncode == 0, done.stderr
    assert installed(log) == RUNTIME - commands_found_in_sbin()


@pytest.mark.skipif(os.geteuid() != 0, reason="the script installs as root only")
def test_the_tests_packages_too_with_test(tmp_path):
    bin_dir, log = stand_ins(tmp_path, installed_packages=("python3-venv",))
    done = run("--test", path=str(bin_dir))
    assert done.returncode == 0, done.stderr
    assert installed(log) == (RUNTIME | TESTS) - {"python3-venv"} - commands_found_in_sbin()


def test_nothing_is_asked_of_apt_when_everything_is_there(tmp_path):
    # This machine has it all (the tests need it); apt-get stands in first on the PATH.
    bin_dir, log = stand_ins(tmp_path, installed_packages=("ca-certificates", "python3-venv"))
    for args in ((), ("--test",)):
        done = run(*args, path=f"{bin_dir}:{os.environ['PATH']}")
        assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr
    assert installed(log) is None


def test_a_wrong_argument_is_refused():
    done = run("--tests", path=os.environ["PATH"])
    assert done.returncode == 2 and "usage: scripts/install-deps [--test]" in done.stderr


def test_run_agent_installs_the_agents_packages_and_run_tests_the_tests_too():
    assert "\nscripts/install-deps\n" in (REPO / "scripts" / "run-agent").read_text()
    assert "\nscripts/install-deps --test\n" in (REPO / "scripts" / "run-tests").read_text()
    assert "\nscripts/install-deps --test " in (REPO / ".ci" / "run").read_text()
