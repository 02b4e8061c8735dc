"""
``pip install -e .`` (and ``pip install .``) give a ``twistd bai-agent`` that works from any
directory: Twisted finds ``twisted/plugins/bai_agent_plugin.py`` on sys.path.

Each test makes a virtualenv that reuses the site-packages of the environment running the
tests (Twisted, setuptools, pip ...) minus any installed copy of bai-agent, and installs the
checkout into it with ``--no-deps --no-build-isolation --no-index``: no network, a few seconds.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

pytestmark = pytest.mark.functional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What an installed copy of bai-agent adds to site-packages; left out of the reused one so
# that only the install under test can provide the package and the plugin.
OURS = ("bai_agent", "__editable__.bai_agent", "__editable___bai_agent")
NOT_SOURCES = ("__pycache__", "dropin.cache")

TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def _link_tree(source, target, skip):
    """``target`` as a directory of symbolic links to ``source``'s entries but ``skip(name)``."""
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(source):
        if not skip(name) and not os.path.lexists(os.path.join(target, name)):
            os.symlink(os.path.join(source, name), os.path.join(target, name))


def _site_packages(venv):
    python = os.path.join(venv, "bin", "python")
    path = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return python, path


def make_venv(path):
    """A virtualenv whose site-packages links to this environment's, bai-agent excluded."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", path], check=True)
    python, site_packages = _site_packages(path)
    sources = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    for source in sorted(sources):
        _link_tree(source, site_packages, lambda name: name.startswith(OURS + NOT_SOURCES) or name == "twisted")
        # twisted/plugins may hold the bai_agent_plugin.py of an earlier install: link the
        # rest of Twisted, leaving that one (and the plugin cache) out.
        twisted = os.path.join(source, "twisted")
        if os.path.isdir(twisted):
            _link_tree(twisted, os.path.join(site_packages, "twisted"), lambda name: name in ("plugins",) + NOT_SOURCES)
            _link_tree(
                os.path.join(twisted, "plugins"),
                os.path.join(site_packages, "twisted", "plugins"),
                lambda name: name.startswith(OURS) or name in NOT_SOURCES,
            )
    return python


def run(python, *args, cwd):
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "PIP_"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", PIP_NO_INPUT="1")
    return subprocess.run([python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def pip_install(python, *args, cwd):
    installed = run(python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", *args, cwd=cwd)
    assert installed.returncode == 0, f"pip install {' '.join(args)} failed:\n{installed.stdout}\n{installed.stderr}"


def twistd_help(python, cwd):
    return run(python, "-c", TWISTD, "bai-agent", "--help", cwd=cwd)


def where(python, cwd):
    """Where ``bai_agent`` and its Twisted plugin are imported from, in that environment."""
    found = run(
        python,
        "-c",
        "import bai_agent, twisted.plugins.bai_agent_plugin as p; print(bai_agent.__file__); print(p.__file__)",
        cwd=cwd,
    )
    assert found.returncode == 0, found.stderr
    package, plugin = found.stdout.split()
    return package, plugin


def assert_twistd_finds_the_plugin(python, cwd, how):
    answered = twistd_help(python, cwd)
    assert answered.returncode == 0 and "--etcd-addr" in answered.stdout, (
        f"after {how}, `twistd bai-agent --help` run from {cwd} does not find the bai-agent plugin "
        f"(twisted/plugins/bai_agent_plugin.py on sys.path); exit status {answered.returncode}:\n"
        f"{answered.stdout}\n{answered.stderr}"
    )


def test_an_editable_install_gives_twistd_the_plugin_from_the_checkout(tmp_path):
    python = make_venv(str(tmp_path / "venv"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = twistd_help(python, elsewhere)
    assert before.returncode != 0, "the test's virtualenv already had a bai-agent plugin before installing"

    pip_install(python, "-e", ROOT, cwd=elsewhere)

    assert_twistd_finds_the_plugin(python, elsewhere, "`pip install -e .`")
    package, plugin = where(python, elsewhere)
    assert package == os.path.join(ROOT, "bai_agent", "__init__.py")
    assert os.path.realpath(plugin) == os.path.join(os.path.realpath(ROOT), "twisted", "plugins", "bai_agent_plugin.py")


def test_a_plain_install_gives_twistd_the_plugin_in_site_packages(tmp_path):
    # Built from a copy of the sources, so that no build/ or egg-info of the checkout (stale
    # files included) takes part, and the checkout is left as it was.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "artifacts", "*.egg-info", "__pycache__", "dropin.cache", ".hypothesis"
        ),
    )
    python = make_venv(str(tmp_path / "venv"))
    _, site_packages = _site_packages(str(tmp_path / "venv"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    pip_install(python, str(source), cwd=elsewhere)

    assert_twistd_finds_the_plugin(python, elsewhere, "`pip install .`")
    package, plugin = where(python, elsewhere)
    assert package == os.path.join(site_packages, "bai_agent", "__init__.py")
    assert plugin == os.path.join(site_packages, "twisted", "plugins", "bai_agent_plugin.py")
