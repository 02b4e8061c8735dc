"""
What managers read and write through the agent without changing a kernel: the files of its
home, its container's output and its statistics. The registry looks the kernel up (which
counts as use for the idle timeout) and hands it here.

File work runs in the registry's thread pool (``run_blocking``), on the host side of
``/home/work``; logs come from the Engine API; samples from the ``StatsCollector``, which
the composition root attaches after both exist (``stats``; None: no statistics).
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime

from bai_agent.docker.interface import DockerError, DockerNotFound, IDockerBackend
from bai_agent.kernels import files
from bai_agent.kernels import kernel as states
from bai_agent.kernels.kernel import Kernel
from bai_agent.protocol import errors
from bai_agent.stats.collector import KernelTarget, empty_sample

if TYPE_CHECKING:
    from bai_agent.stats.collector import StatsCollector

MAX_LOG_TAIL = 1_000_000


class PassThrough:
    """
    :param clock: for the time of an empty sample.
    :param backend: the ``IDockerBackend`` that reads containers' logs.
    :param run_blocking: ``(f, *args) -> Deferred``, off the reactor thread.
    :param home_of: the host directory of a kernel's home, by kernel id.
    :param max_upload_size: the largest file an upload may make.
    """

    def __init__(
        self,
        clock: IReactorTime,
        backend: IDockerBackend,
        run_blocking: Callable[..., Deferred[Any]],
        home_of: Callable[[str], str],
        max_upload_size: int,
    ) -> None:
        self.clock = clock
        self.backend = backend
        self.run_blocking = run_blocking
        self.home_of = home_of
        self.max_upload_size = max_upload_size
        self.stats: StatsCollector | None = None

    # -- files -----------------------------------------------------------------------------

    def upload(self, kernel: Kernel, path: str, data: bytes, append: bool) -> Deferred[Any]:
        home = self.home_of(kernel.kernel_id)
        return self.run_blocking(files.upload, home, path, data, append, self.max_upload_size)

    def download(self, kernel: Kernel, path: str, offset: int, length: int) -> Deferred[Any]:
        return self.run_blocking(files.download, self.home_of(kernel.kernel_id), path, offset, length)

    def list_files(self, kernel: Kernel, path: str) -> Deferred[Any]:
        return self.run_blocking(files.list_files, self.home_of(kernel.kernel_id), path)

    # -- logs ------------------------------------------------------------------------------

    @inlineCallbacks
    def logs(self, kernel: Kernel, tail: int | None = None) -> Generator[Deferred[Any], Any, str]:
        """The container's output (the runner's own log), from the Engine API."""
        if tail is not None and (tail < 0 or tail > MAX_LOG_TAIL):
            raise errors.InvalidRequest(f"tail must be between 0 and {MAX_LOG_TAIL} lines, got {tail}")
        if kernel.container_id is None:
            return ""
        try:
            text: str = yield self.backend.container_logs(kernel.container_id, tail=tail)
        except DockerNotFound:
            raise errors.KernelNotFound(f"kernel {kernel.kernel_id!r} has no container any more") from None
        except DockerError as e:
            raise errors.BackendUnavailable(f"could not read the logs of kernel {kernel.kernel_id}: {e}") from e
        return text

    # -- statistics --------------------------------------------------------------------------

    def targets(self, kernels: Iterable[Kernel]) -> list[KernelTarget]:
        """The kernels the statistics collector samples: those with a running container."""
        return [
            self._target(kernel, kernel.container_id)
            for kernel in kernels
            if kernel.status == states.RUNNING and kernel.container_id is not None
        ]

    def _target(self, kernel: Kernel, container_id: str) -> KernelTarget:
        return KernelTarget(kernel.kernel_id, container_id, self.home_of(kernel.kernel_id))

    @inlineCallbacks
    def kernel_stats(self, kernel: Kernel) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        """The latest statistics sample of a kernel (a fresh one if it has none yet)."""
        if self.stats is None:
            raise errors.BackendUnavailable("this agent collects no statistics")
        latest = self.stats.latest(kernel.kernel_id)
        if latest is None and kernel.status == states.RUNNING and kernel.container_id is not None:
            latest = yield self.stats.sample_kernel(self._target(kernel, kernel.container_id))
        return latest if latest is not None else empty_sample(self.clock.seconds())

    @inlineCallbacks
    def sample_before_stop(self, kernel: Kernel) -> Generator[Deferred[Any], Any, None]:
        """The last sample, taken while the container still runs: it goes into the answer and the event."""
        if self.stats is None or kernel.container_id is None:
            return
        kernel.last_stats = yield self.stats.sample_kernel(self._target(kernel, kernel.container_id))

    def keep_last_sample(self, kernel: Kernel) -> None:
        """After the container ended: the latest sample there is; the collector forgets the kernel."""
        if self.stats is not None:
            latest = self.stats.latest(kernel.kernel_id)
            if latest is not None:
                kernel.last_stats = latest
            self.stats.forget(kernel.kernel_id)
