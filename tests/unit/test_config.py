import os

import pytest

from bai_agent.config import AgentConfig, default_agent_id
from bai_agent.values import parse_cpu, parse_heartbeat_interval, parse_host_port, parse_size, parse_timeout


@pytest.mark.parametrize(
    "text, size",
    [("1024", 1024), ("512m", 512 << 20), ("2g", 2 << 30), ("1.5G", 3 << 29), ("64MiB", 64 << 20), (7, 7)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["12q", "-5", "", "m", "1e400", "9" * 400 + "g", True, None, -1, float("nan"), 1.5])
def test_parse_size_refuses_with_value_error(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_host_port():
    assert parse_host_port("127.0.0.1:2379") == ("127.0.0.1", 2379)
    assert parse_host_port("[::1]:2379") == ("::1", 2379)
    for bad in ("host", "host:0", "host:70000", ":80", "host:x"):
        with pytest.raises(ValueError):
            parse_host_port(bad)


def test_default_agent_id_is_a_valid_id():
    AgentConfig(agent_id=default_agent_id())


def test_config_refuses_invalid_ids():
    with pytest.raises(ValueError):
        AgentConfig(agent_id="a/b")
    with pytest.raises(ValueError):
        AgentConfig(namespace="")


def test_other_parsers_refuse_with_value_error_never_type_error():
    for parse in (parse_cpu, parse_heartbeat_interval, parse_timeout):
        for bad in (None, True, [], "soon"):
            with pytest.raises(ValueError):
                parse(bad)


@pytest.mark.parametrize(
    "field, value, option",
    [
        ("etcd_addr", "nohost", "--etcd-addr"),
        ("namespace", "a/b", "--namespace"),
        ("agent_id", "x" * 65, "--agent-id"),
        ("amp_endpoint", "bogus:1", "--amp-endpoint"),
        ("http_endpoint", "tcp:notaport", "--http-endpoint"),
        ("advertise_host", "", "--advertise-host"),
        ("docker_host", "http://x", "--docker-host"),
        ("heartbeat_interval", "0.1", "--heartbeat-interval"),
        ("secret_file", "/nonexistent/secret", "--secret-file"),
        ("reserved_cpu", -1, "--reserved-cpu"),
        ("reserved_mem", "12q", "--reserved-mem"),
        ("allowed_mount_roots", ["relative/dir"], "--allowed-mount-root"),
        ("allowed_mount_roots", ["/etc"], "--allowed-mount-root"),
        ("allowed_mount_roots", "/srv", "--allowed-mount-root"),
        ("kernel_network", "no network", "--kernel-network"),
        ("kernel_pids_limit", 8, "--kernel-pids-limit"),
        ("kernel_pids_limit", "many", "--kernel-pids-limit"),
        ("max_upload_size", 0, "--max-upload-size"),
        ("stop_grace_period", float("nan"), "--stop-grace-period"),
        ("default_scratch_size", "1m", "--default-scratch-size"),
        ("scratch_type", "zfs", "--scratch-type"),
        ("destroy_kernels_on_stop", "yes", "--destroy-kernels-on-stop"),
        ("authentication_deadline", 0, "authentication_deadline"),
    ],
)
def test_config_refuses_a_bad_value_naming_its_option(field, value, option):
    with pytest.raises(ValueError) as raised:
        AgentConfig(**{field: value})
    assert str(raised.value).startswith(f"{option}: "), str(raised.value)


def test_config_converts_text_to_numbers():
    config = AgentConfig(
        heartbeat_interval="0.5",
        reserved_cpu="1.5",
        reserved_mem="2g",
        kernel_pids_limit="64",
        max_upload_size="1m",
        stop_grace_period="2.5",
        default_scratch_size="16m",
        authentication_deadline="1",
    )
    assert (config.heartbeat_interval, config.reserved_cpu, config.reserved_mem) == (0.5, 1.5, 2 << 30)
    assert (config.kernel_pids_limit, config.max_upload_size, config.stop_grace_period) == (64, 1 << 20, 2.5)
    assert (config.default_scratch_size, config.authentication_deadline) == (16 << 20, 1.0)


def test_config_keeps_allowed_mount_roots_as_real_paths(tmp_path):
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "data", tmp_path / "link")
    config = AgentConfig(allowed_mount_roots=[str(tmp_path / "link")])
    assert config.allowed_mount_roots == (os.path.realpath(tmp_path / "data"),)


def test_config_checks_the_secret_file_with_the_one_secret_check(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("ab" * 32 + "\n")
    assert AgentConfig(secret_file=str(secret)).secret_file == str(secret)
    secret.write_text("abc123\n")
    with pytest.raises(ValueError, match="--secret-file: the secret file .* must hold at least 64 hex digits"):
        AgentConfig(secret_file=str(secret))


def test_making_a_config_creates_no_directory(tmp_path):
    AgentConfig(scratch_root=str(tmp_path / "scratch"), state_dir=str(tmp_path / "state"))
    assert os.listdir(tmp_path) == []
