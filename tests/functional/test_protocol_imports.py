"""
``bai_agent.protocol`` is shared with the managers: in a fresh interpreter it imports
without any other part of the agent.
"""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.functional


def test_protocol_module_imports_without_the_rest_of_the_agent():
    code = (
        "import sys; import bai_agent.protocol, bai_agent.protocol.discovery;"
        "bad = [m for m in sys.modules if m.startswith('bai_agent.') and not m.startswith('bai_agent.protocol')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
