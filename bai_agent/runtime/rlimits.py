"""
Process resource limits the agent sets for itself at start.

The open-file limit: every manager connection, runner socket, Docker and etcd stream
takes a file descriptor, and many distributions start services with a soft limit of 1024
under a far higher hard one. The agent raises its soft limit to the hard one (which
only the supervisor can raise: ``LimitNOFILE=`` in ``contrib/systemd/bai-agent.service``).
"""

from __future__ import annotations

import resource as resource_module
from typing import Any

from twisted.logger import Logger

log = Logger()

#: Linux refuses an open-file limit above ``fs.nr_open``; used when the hard limit is unlimited.
NR_OPEN_PATH = "/proc/sys/fs/nr_open"


def raise_open_file_limit(resource: Any = resource_module, nr_open_path: str = NR_OPEN_PATH) -> tuple[int, int, int]:
    """
    Raise the soft RLIMIT_NOFILE to the hard limit; ``(soft before, soft after, hard)``.
    ``resource`` is the ``resource`` module, or a stand-in with its names.
    A failure is logged, never raised: the agent runs on with the limit it has.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = _nr_open(nr_open_path)
        if target is None:
            log.info("open-file limit left at {soft}: the hard limit is unlimited", soft=soft)
            return soft, soft, hard
    if soft != resource.RLIM_INFINITY and soft >= target:
        log.info("open-file limit {soft} (hard limit {hard})", soft=soft, hard=_shown(hard))
        return soft, soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as error:
        log.warn(
            "could not raise the open-file limit from {soft} to {target}: {error}",
            soft=soft,
            target=target,
            error=error,
        )
        return soft, soft, hard
    log.info("raised the open-file limit from {soft} to {target} (the hard limit)", soft=soft, target=target)
    return soft, target, hard


def _nr_open(path: str) -> int | None:
    try:
        with open(path) as nr_open:
            return int(nr_open.read().strip())
    except (OSError, ValueError):
        return None


def _shown(limit: int) -> int | str:
    return "unlimited" if limit == resource_module.RLIM_INFINITY else limit
