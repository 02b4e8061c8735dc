"""bai-agent: the worker-node daemon of a Backend.AI-style compute cluster."""

__version__ = "0.1.0"
