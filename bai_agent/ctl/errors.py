"""The error a ``bai-agent-ctl`` command reports to its user."""


class CtlError(Exception):
    """A failure to report to the user in one line, with exit status 1."""
