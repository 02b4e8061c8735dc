"""The service-ports label and the service definition files, as an image may write them."""

import json

import pytest
from twisted.logger import Logger

from bai_agent.protocol.labels import SERVICE_PORTS_LABEL
from bai_agent.services.declarations import (
    MAX_ARGV_ITEMS,
    MAX_DEFINITION_BYTES,
    ServiceDeclarationError,
    ServiceDefinition,
    ServicePort,
    declared_services,
    parse_service_definition,
    parse_service_ports,
    render,
    url,
)


def test_label_declares_services_in_order():
    services = parse_service_ports("jupyter:http:8888, sshd:tcp:2200")
    assert list(services) == ["jupyter", "sshd"]
    assert services["jupyter"] == ServicePort("jupyter", "http", 8888)
    assert services["sshd"] == ServicePort("sshd", "tcp", 2200)


def test_empty_label_declares_nothing():
    assert parse_service_ports("") == {}
    assert parse_service_ports("  ") == {}


@pytest.mark.parametrize(
    "label, message",
    [
        ("jupyter:http", "not name:protocol:port"),
        ("jupyter:http:8888:1", "not name:protocol:port"),
        ("jupyter:http:8888,", "not name:protocol:port"),
        ("Jupyter:http:8888", "service name"),
        ("1up:http:8888", "service name"),
        ("a" * 33 + ":http:8888", "service name"),
        ("my_app:http:8888", "service name"),
        ("jupyter:udp:8888", "protocol 'udp'"),
        ("jupyter:HTTP:8888", "protocol"),
        ("jupyter:http:1024", "not in 1025..65535"),
        ("jupyter:http:65536", "not in 1025..65535"),
        ("jupyter:http:0", "not in"),
        ("jupyter:http:-1", "not a number"),
        ("jupyter:http:８８８８", "not a number"),
        ("jupyter:http:88 88", "not a number"),
        ("jupyter:http:00000008888", "not a number"),
        ("jupyter:http:8888,jupyter:tcp:8889", "declared twice"),
        ("jupyter:http:8888,lab:http:8888", "same port 8888"),
    ],
)
def test_bad_label_is_a_clear_error(label, message):
    with pytest.raises(ServiceDeclarationError, match=message):
        parse_service_ports(label)


def test_longest_name_is_accepted():
    name = "a" + "b-9" * 10 + "c"
    assert len(name) == 32
    assert parse_service_ports(f"{name}:tcp:65535")[name].port == 65535


def test_declaration_error_is_a_value_error():
    assert issubclass(ServiceDeclarationError, ValueError)


class RecordingLog:
    def __init__(self):
        self.events = []

    def warn(self, format, **fields):
        self.events.append((format, fields))


def test_declared_services_from_labels():
    log = RecordingLog()
    labels = {SERVICE_PORTS_LABEL: "jupyter:http:8888", "other": "x"}
    assert declared_services(labels, log) == {"jupyter": ServicePort("jupyter", "http", 8888)}
    assert declared_services({}, log) == {}
    assert log.events == []


def test_bad_label_is_logged_and_declares_nothing():
    log = RecordingLog()
    assert declared_services({SERVICE_PORTS_LABEL: "jupyter:http:80"}, log) == {}
    [(_format, fields)] = log.events
    assert fields["label"] == SERVICE_PORTS_LABEL
    assert "not in 1025..65535" in fields["error"]


def test_declared_services_with_a_real_logger():
    assert declared_services({SERVICE_PORTS_LABEL: "x"}, Logger()) == {}


JUPYTER = {
    "command": ["jupyter", "lab", "--ip={host}", "--port={port}", "--IdentityProvider.token={token}"],
    "env": {"JUPYTER_CONFIG_DIR": "{home}/.jupyter", "PLAIN": "a {{literal}} brace"},
    "url_template": "http://{host}:{port}/lab?token={token}",
}


def test_definition_parses_and_renders():
    definition = parse_service_definition(json.dumps(JUPYTER), "jupyter")
    assert definition.command[0] == "jupyter"
    argv, env = render(definition, 8888, "s3cret", "/home/work")
    assert argv == ["jupyter", "lab", "--ip=127.0.0.1", "--port=8888", "--IdentityProvider.token=s3cret"]
    assert env == {"JUPYTER_CONFIG_DIR": "/home/work/.jupyter", "PLAIN": "a {literal} brace"}
    assert (
        url(definition.url_template, "agent.example", 30001, "s3cret") == "http://agent.example:30001/lab?token=s3cret"
    )


def test_definition_from_bytes_without_env_or_url():
    definition = parse_service_definition(b'{"command": ["sshd", "-p", "{port}"]}')
    assert definition == ServiceDefinition(("sshd", "-p", "{port}"), {}, None)
    assert render(definition, 2200, "t", "/h") == (["sshd", "-p", "2200"], {})
    assert url(definition.url_template, "h", 1, "t") is None


def test_substituted_values_are_not_reinterpreted():
    definition = parse_service_definition('{"command": ["echo", "{token}"]}')
    assert render(definition, 1, "{home}{0.__class__}", "/h")[0] == ["echo", "{home}{0.__class__}"]


def test_definition_is_frozen():
    definition = parse_service_definition('{"command": ["x"]}')
    with pytest.raises(AttributeError):
        definition.command = ("y",)


@pytest.mark.parametrize(
    "document, message",
    [
        ("not json", "not JSON"),
        ("[1]", "not a JSON object"),
        ("{}", "command must be a non-empty list"),
        ('{"command": []}', "command must be a non-empty list"),
        ('{"command": "jupyter lab"}', "command must be a non-empty list"),
        ('{"command": ["a", 1]}', r"command\[1\] is not a string"),
        ('{"command": ["a"], "env": []}', "env must be an object"),
        ('{"command": ["a"], "env": {"A": 1}}', "env A is not a string"),
        ('{"command": ["a"], "env": {"A=B": "x"}}', "not a variable name"),
        ('{"command": ["a"], "env": {"": "x"}}', "not a variable name"),
        ('{"command": ["a"], "url_template": 5}', "url_template is not a string"),
        ('{"command": ["a"], "extra": 1}', r"unknown keys \['extra'\]"),
        ('{"command": ["{user}"]}', r"placeholder \{user\} is not one of"),
        ('{"command": ["{0}"]}', r"placeholder \{0\}"),
        ('{"command": ["{}"]}', r"placeholder \{\}"),
        ('{"command": ["{port.__class__}"]}', "placeholder"),
        ('{"command": ["{home[0]}"]}', "placeholder"),
        ('{"command": ["{port:>10}"]}', r"placeholder \{port:>10\}"),
        ('{"command": ["{token!r}"]}', r"placeholder \{token!r\}"),
        ('{"command": ["a {"]}', "bad braces"),
        ('{"command": ["a }"]}', "bad braces"),
        ('{"command": ["a"], "env": {"A": "{x}"}}', "env A: placeholder"),
        ('{"command": ["a"], "url_template": "http://{ip}/"}', r"url_template: placeholder \{ip\}"),
        ('{"command": ["a\\u0000b"]}', "NUL"),
        ("[" * 100000 + "]" * 100000, "more than"),
    ],
)
def test_bad_definition_is_a_clear_error(document, message):
    with pytest.raises(ServiceDeclarationError, match=message):
        parse_service_definition(document, "jupyter")


def test_definition_size_is_bounded():
    padding = "x" * MAX_DEFINITION_BYTES
    with pytest.raises(ServiceDeclarationError, match="more than 65536"):
        parse_service_definition(json.dumps({"command": [padding]}))
    # the bound is on bytes: multi-byte characters count as what they weigh
    with pytest.raises(ServiceDeclarationError, match="more than"):
        parse_service_definition(json.dumps({"command": ["é" * 40000]}, ensure_ascii=False))


def test_deep_nesting_within_the_size_is_an_error_not_a_crash():
    with pytest.raises(ServiceDeclarationError):
        parse_service_definition("[" * 30000 + "]" * 30000)


def test_argv_items_are_bounded():
    parse_service_definition(json.dumps({"command": ["a"] * MAX_ARGV_ITEMS}))
    with pytest.raises(ServiceDeclarationError, match="more than 256 items"):
        parse_service_definition(json.dumps({"command": ["a"] * (MAX_ARGV_ITEMS + 1)}))
