"""
The agent's runtime toolkit, used by every service: periodic work that never dies
(``periodic``), tracking of work in flight (``inflight``), retry delays (``backoff``),
rate-limited logging (``lograte``) and the process's resource limits (``rlimits``).
Nothing here knows kernels, the wire or the page.
"""
