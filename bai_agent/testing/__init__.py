"""
The agent's test toolkit, for its own tests and for managers' tests (nothing here imports
the global reactor: a reactor or clock is always a parameter).

Fakes and contracts, with one contract suite run against the fake and the real thing:

- ``fake_docker``: ``FakeDockerBackend``, an in-memory ``IDockerBackend``;
  ``docker_contract``: the suite every ``IDockerBackend`` passes.
- ``memory_etcd``: ``MemoryEtcd``, an in-memory ``IEtcd``; ``etcd_contract``: its suite.
- ``fake_runner``: runner links for kernels on the fake backend; ``fake_nvml``: a
  ``pynvml`` without devices; ``backends``: a whole agent's backends built on the fakes.

Helpers:

- ``deferreds``: ``result_of``, ``failure_of``, ``error_of`` and ``has_fired``, for
  Deferreds that have already fired (tests on ``task.Clock`` and the fakes).
- ``waiting``: ``sleep``, ``wait_until``, ``wait_until_blocking``, ``blocking`` and
  ``block_until``, bounded waits for tests that run a real reactor (or none).
- ``standin_docker``: ``StandInDaemon``, a ``twisted.web`` resource that answers like
  dockerd, for the Engine API client over a real socket.

Real components, for functional and fault tests (blocking; fixtures and set-up only):

- ``docker_cli``: the ``docker`` command line (``docker``, ``agent_containers``,
  ``remove_containers``); ``docker_host``: the daemon over its API (find it, tiny local
  images, the kernel image); ``private_docker``: a dockerd of the test's own.
- ``etcd_server``: a real etcd on free loopback ports.
"""
