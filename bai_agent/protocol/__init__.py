"""
The wire contract between bai-agent and managers (PROTOCOL.md), importable on its own:
commands, argument types, errors, ``AgentClient`` and etcd discovery helpers.
"""

from bai_agent.protocol.client import AgentClient
from bai_agent.protocol.commands import PROTOCOL_VERSION

__all__ = ["AgentClient", "PROTOCOL_VERSION"]
