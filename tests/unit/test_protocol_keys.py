"""The etcd key layout of PROTOCOL.md section 4, in one place."""

from bai_agent.protocol import discovery, keys


def test_keys_follow_the_published_layout():
    assert keys.namespace_prefix("ns") == b"/bai/ns/"
    assert keys.agents_prefix("ns") == b"/bai/ns/agents/"
    assert keys.agent_key("ns", "agent-1") == b"/bai/ns/agents/agent-1"
    assert keys.agent_config_prefix("ns") == b"/bai/ns/config/agent/"
    assert keys.agent_config_key("ns", "idle_timeout") == b"/bai/ns/config/agent/idle_timeout"
    assert keys.secret_key("ns") == b"/bai/ns/config/agent/secret"
    assert keys.registry_key("ns", "registry.local:5000") == b"/bai/ns/config/registries/registry.local:5000"


def test_every_agent_key_and_config_key_lies_under_its_prefix():
    assert keys.agent_key("ns", "a").startswith(keys.agents_prefix("ns"))
    assert keys.secret_key("ns").startswith(keys.agent_config_prefix("ns"))
    assert keys.name_under(keys.agent_config_prefix("ns"), keys.secret_key("ns")) == keys.SECRET_NAME


def test_discovery_uses_the_same_keys():
    assert discovery.agents_prefix("ns") == keys.agents_prefix("ns")
    assert discovery.secret_key("ns") == keys.secret_key("ns")
