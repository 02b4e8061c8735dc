"""`twistd bai-agent` options: defaults, validation, usage errors that name the option."""

import os
import re

import pytest
from twisted.python import usage

from bai_agent.tap import Options


def parse(tmp_path, *argv):
    options = Options()
    base = ["--scratch-root", str(tmp_path / "scratch"), "--state-dir", str(tmp_path / "state")]
    options.parseOptions(base + list(argv))
    return options.config


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    config = parse(tmp_path)
    assert config.etcd_addr == "127.0.0.1:2379"
    assert config.namespace == "local"
    assert config.amp_endpoint == "tcp:6001"
    assert config.http_endpoint == "tcp:6003:interface=127.0.0.1"
    assert config.docker_host == "unix:///var/run/docker.sock"
    assert config.heartbeat_interval == 3.0
    assert config.reserved_cpu == 0 and config.reserved_mem == 0
    assert config.agent_id  # from the host name
    assert config.stop_grace_period == 10.0 and config.destroy_kernels_on_stop is False
    assert parse(tmp_path).agent_id == config.agent_id  # stable


def test_docker_host_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:2375")
    assert parse(tmp_path).docker_host == "tcp://127.0.0.1:2375"


def test_scratch_root_and_state_dir_are_created_private(tmp_path):
    parse(tmp_path)
    for name in ("scratch", "state"):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == "0o700"


def test_values_are_parsed(tmp_path):
    config = parse(
        tmp_path,
        "--reserved-mem",
        "2g",
        "--reserved-cpu",
        "1.5",
        "--heartbeat-interval",
        "0.5",
        "--agent-id",
        "node-7",
        "--namespace",
        "prod",
        "--stop-grace-period",
        "2.5",
        "--destroy-kernels-on-stop",
    )
    assert config.stop_grace_period == 2.5 and config.destroy_kernels_on_stop is True
    assert config.reserved_mem == 2 << 30
    assert config.reserved_cpu == 1.5
    assert config.heartbeat_interval == 0.5
    assert (config.agent_id, config.namespace) == ("node-7", "prod")


@pytest.mark.parametrize(
    "option, value",
    [
        ("--etcd-addr", "nohost"),
        ("--etcd-addr", "host:99999"),
        ("--namespace", "a/b"),
        ("--agent-id", "../etc"),
        ("--agent-id", "x" * 65),
        ("--amp-endpoint", "bogus:1"),
        ("--http-endpoint", "tcp:notaport"),
        ("--docker-host", "http://x"),
        ("--heartbeat-interval", "0"),
        ("--heartbeat-interval", "nan"),
        ("--heartbeat-interval", "0.1"),
        ("--heartbeat-interval", "1000"),
        ("--reserved-cpu", "-1"),
        ("--reserved-cpu", "lots"),
        ("--reserved-mem", "12q"),
        ("--reserved-mem", "-5"),
        ("--secret-file", "/nonexistent/secret"),
        ("--stop-grace-period", "-1"),
        ("--stop-grace-period", "nan"),
        ("--stop-grace-period", "soon"),
        ("--stop-grace-period", "7200"),
    ],
)
def test_bad_values_fail_with_a_usage_error_naming_the_option(tmp_path, option, value):
    with pytest.raises(usage.UsageError) as raised:
        parse(tmp_path, option, value)
    assert str(raised.value).startswith(option), str(raised.value)


def test_short_secret_file_is_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("abc123\n")
    with pytest.raises(usage.UsageError, match="--secret-file"):
        parse(tmp_path, "--secret-file", str(secret))


def test_unwritable_scratch_root_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(usage.UsageError, match="--scratch-root: cannot create scratch root"):
        Options().parseOptions(["--scratch-root", str(blocker / "sub"), "--state-dir", str(tmp_path / "s")])


def test_a_state_dir_too_long_for_runner_sockets_is_a_usage_error(tmp_path):
    state = tmp_path / ("s" * 100)
    with pytest.raises(usage.UsageError, match="--state-dir: state dir .* is too long"):
        Options().parseOptions(["--scratch-root", str(tmp_path / "scratch"), "--state-dir", str(state)])


def test_a_bad_value_creates_no_directory(tmp_path):
    with pytest.raises(usage.UsageError, match="--kernel-network"):
        parse(tmp_path, "--kernel-network", "no network")
    assert os.listdir(tmp_path) == []


def declared_options():
    """
    ``(option, takes a value, help text)`` of every option ``Options`` declares: its
    ``optParameters``, its ``optFlags`` and its ``opt_*`` methods (twistd's own included).
    """
    found = []
    for long_name, _short, _default, *rest in Options.optParameters:
        found.append((f"--{long_name}", True, rest[0] if rest else None))
    for long_name, _short, *rest in Options.optFlags:
        found.append((f"--{long_name}", False, rest[0] if rest else None))
    for attribute in dir(Options):
        if attribute.startswith("opt_"):
            method = getattr(Options, attribute)
            name = attribute[len("opt_") :].replace("_", "-")
            takes_value = method.__code__.co_argcount > 1
            found.append((f"--{name}" if len(name) > 1 else f"-{name}", takes_value, method.__doc__))
    return found


def test_declared_options_include_the_agents_parameters_flags_and_methods():
    names = {name for name, _, _ in declared_options()}
    assert {"--etcd-addr", "--destroy-kernels-on-stop", "--allowed-mount-root", "--help"} <= names


@pytest.mark.parametrize(
    ("option", "takes_value", "doc"), declared_options(), ids=[option for option, _, _ in declared_options()]
)
def test_help_documents_every_option(option, takes_value, doc):
    assert doc and doc.strip(), f"{option} has no help text"
    # Twisted wraps help across lines, also after the hyphen of a word: with whitespace
    # collapsed (and words broken at a hyphen joined), the option is followed by its text.
    words = re.sub(r"(?<=\w)- (?=\w)", "-", " ".join(str(Options()).split()))
    shown = f"{option}= " if takes_value and option.startswith("--") else f"{option} "
    assert shown + " ".join(doc.split()) in words, f"{option} is not in --help with its text"


def test_a_second_sigterm_does_not_stop_the_reactor_twice():
    from bai_agent.tap import sigterm_handler

    class Reactor:
        def __init__(self):
            self.calls = []

        def callFromThread(self, f, *args):
            self.calls.append(f)

        def stop(self):
            pass

    reactor = Reactor()
    handler = sigterm_handler(reactor)
    handler(15, None)
    handler(15, None)
    assert reactor.calls.count(reactor.stop) == 1
    assert len(reactor.calls) == 2  # the second one is only logged
