"""``python -m bai_agent.ctl``: the same as ``bai-agent-ctl``."""

from bai_agent.ctl.cli import main

main()
