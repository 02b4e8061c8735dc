"""
docs/protocol.md, the published contract, names everything the code puts on the wire:
every command (with its arguments), every error code, every event type and termination
reason, every etcd key. A wire name added to the code and not to the page fails here.
"""

import os
import re

import pytest

from bai_agent.protocol import commands, errors, events, keys, labels

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "protocol.md")


@pytest.fixture(scope="module")
def doc():
    with open(DOC, encoding="utf-8") as page:
        return page.read()


def table_rows(doc):
    """``{commandName: row text}`` of the command tables of sections 2 and 3."""
    rows = {}
    for line in doc.splitlines():
        match = re.match(r"\|\s*`([A-Za-z]+)`\s*\|", line)
        if match:
            rows.setdefault(match.group(1), "")
            rows[match.group(1)] += line
    return rows


def test_every_command_has_a_row_naming_its_arguments(doc):
    rows = table_rows(doc)
    missing = []
    for name, command in sorted(commands.COMMANDS_BY_NAME.items()):
        row = rows.get(name.decode())
        if row is None:
            missing.append(name.decode())
            continue
        for argument, _ in command.arguments:
            argument = argument.decode() if isinstance(argument, bytes) else argument
            if f"`{argument}`" not in row:
                missing.append(f"{name.decode()}.{argument}")
    assert missing == [], f"docs/protocol.md does not document: {missing}"


def test_every_error_code_is_documented(doc):
    missing = [error.code.decode() for error in errors.ALL_ERRORS if f"`{error.code.decode()}`" not in doc]
    assert missing == [], f"docs/protocol.md does not name the error codes {missing}"


def test_every_event_type_and_termination_reason_is_documented(doc):
    missing = [name for name in events.EVENT_TYPES + events.TERMINATION_REASONS if f"`{name}`" not in doc]
    assert missing == [], f"docs/protocol.md does not name {missing}"


def test_every_label_is_documented(doc):
    names = [value for name, value in vars(labels).items() if name.endswith("_LABEL") and isinstance(value, str)]
    assert names, "no labels found in bai_agent.protocol.labels"
    missing = [name for name in names if name not in doc]
    assert missing == [], f"docs/protocol.md does not name the labels {missing}"


def test_every_etcd_key_is_documented(doc):
    layout = [
        keys.agents_prefix("{namespace}"),
        keys.agent_key("{namespace}", "{agent_id}"),
        keys.secret_key("{namespace}"),
        keys.agent_config_prefix("{namespace}"),
    ]
    relative = [key.decode()[len("/bai/{namespace}/") :] for key in layout]
    missing = [key for key in relative if key.rstrip("/") not in doc]
    tunables = [keys.HEARTBEAT_INTERVAL, keys.IDLE_TIMEOUT, keys.EXEC_TIMEOUT]
    missing += [name for name in tunables if name not in doc]
    assert missing == [], f"docs/protocol.md does not name the etcd keys {missing}"
