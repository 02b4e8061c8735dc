"""
Entry point of the runner in a kernel container (see ``server.py``).

Kept tiny on purpose: Python caches the bytecode of imported modules (``__pycache__``,
written by the agent when it starts), never of the script it runs, so the real work
lives in ``server`` and a kernel's start does not pay for compiling it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import server  # noqa: E402

if __name__ == "__main__":
    sys.exit(server.main())
