import pytest

from bai_agent.config import AgentConfig, default_agent_id, parse_host_port, parse_size


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
