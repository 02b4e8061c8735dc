"""
The statistics collector: every ``interval`` seconds, one round of samples of every
running kernel (cgroup counters, network, scratch dir size), of the node (psutil) and of
its GPUs (NVML).

A round makes one ``run_blocking`` call: all the file reads of all kernels, psutil and
NVML happen in one worker thread, and the reactor thread only turns the raw numbers into
samples (rates, maxima) and stores them. Rounds never overlap: a tick that comes while
a round is still running is skipped. A failure in one kernel's reading is logged (once
per kernel) and leaves the others alone; a failing round is logged and the next tick
comes as usual.

Kernel sample keys (PROTOCOL.md ``GetKernelStats``) are ``SAMPLE_KEYS`` of
``bai_agent.protocol.samples``, which says the unit of each.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bai_agent.protocol import samples
from bai_agent.protocol.samples import SAMPLE_KEYS
from bai_agent.runtime.periodic import PeriodicService
from bai_agent.stats.scratch import ScratchSizer

log = Logger()

#: A sample (a kernel's, keys ``SAMPLE_KEYS``, or the node's): JSON-ready values by name.
Sample = dict[str, Any]

if TYPE_CHECKING:
    from bai_agent.stats.gpu import GpuStats
    from bai_agent.stats.node import NodeStats

    # One kernel's reading from the worker thread: the cgroup counters (None: no cgroup;
    # an exception: the reading failed), when they were read, the scratch dir's bytes
    # (None: not measured this time).
    _Reading = tuple[Mapping[str, Any] | Exception | None, float, int | None]
    # A round's readings: the kernels', the node's (or its error), the GPUs' (or why there
    # are none), when the node was read, the worker thread's CPU seconds.
    _RoundReadings = tuple[
        list[_Reading], Sample | None, Exception | None, list[Sample] | None, str | None, float, float
    ]


class CgroupSource(Protocol):
    """What the collector reads kernels' counters from: a ``CgroupReader``, or a fake."""

    def read(self, container_id: str) -> Mapping[str, Any] | None: ...


# What a sample copies from the cgroup reading as it is.
_COUNTERS = (
    samples.MEM_BYTES,
    samples.IO_READ_BYTES,
    samples.IO_WRITE_BYTES,
    samples.NET_RX_BYTES,
    samples.NET_TX_BYTES,
    samples.PIDS,
)


def empty_sample(sampled_at: float) -> Sample:
    """A sample of zeros: what a kernel that was never sampled reports."""
    sample: Sample = {key: 0 for key in SAMPLE_KEYS}
    sample[samples.CPU_UTIL] = 0.0
    sample[samples.SAMPLED_AT] = float(sampled_at)
    return sample


@attrs.frozen
class KernelTarget:
    """A kernel to sample: its container, and its home on the host (None: no home)."""

    kernel_id: str
    container_id: str
    scratch_dir: str | None = None


class _KernelState:
    """What the collector remembers of one kernel between samples."""

    def __init__(self, target: KernelTarget, sizer: ScratchSizer | None) -> None:
        self.container_id = target.container_id
        self.sizer = sizer
        self.previous_cpu_ns: int | None = None
        self.previous_at: float | None = None
        self.mem_max = 0
        self.scratch_bytes = 0
        self.latest: Sample | None = None
        self.failing = False  # its last reading failed and that was logged


class StatsCollector(Service):
    """
    :param clock: ``IReactorTime``; the loop's clock, and ``sampled_at``.
    :param cgroups: a ``CgroupReader`` (anything with ``read(container_id)``).
    :param kernels: ``() -> iterable of KernelTarget``, the kernels to sample now.
    :param run_blocking: ``(f, *args) -> Deferred``, running ``f`` in a worker thread.
    :param node: a ``NodeStats``, or None for no node statistics.
    :param gpus: a ``GpuStats``, or None; the collector opens it in its first round and
        closes it when it stops.
    :param interval: seconds between rounds.
    :param sizer_factory: ``(scratch_dir) -> ScratchSizer``-like, for tests and tuning.
    """

    def __init__(
        self,
        clock: IReactorTime,
        cgroups: CgroupSource,
        kernels: Callable[[], Iterable[KernelTarget]],
        run_blocking: Callable[..., Deferred[Any]],
        node: NodeStats | None = None,
        gpus: GpuStats | None = None,
        interval: float = 5.0,
        sizer_factory: Callable[[str], ScratchSizer] = ScratchSizer,
    ) -> None:
        if not (isinstance(interval, (int, float)) and interval > 0):
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
        self._clock = clock
        self._cgroups = cgroups
        self._kernels = kernels
        self._run_blocking = run_blocking
        self._node = node
        self._gpus = gpus
        self._gpus_tried = False
        self.interval = float(interval)
        self._sizer_factory = sizer_factory
        self._states: dict[str, _KernelState] = {}
        self._node_latest: Sample | None = None
        self._loop: PeriodicService | None = None
        self._round_running = False
        self._round_waiters: list[Deferred[None]] = []
        #: agent CPU time (of the worker thread) the last round took, in seconds
        self.sample_seconds = 0.0
        #: rounds completed, for metrics
        self.rounds = 0
        self._round_listeners: list[Callable[[], object]] = []

    # -- service ----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop = PeriodicService(self._clock, self.interval, self._tick, what="statistics round")
        self._loop.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stopService()
        self._loop = None
        d = self._when_round_done()

        def closed(_: object) -> None:
            for state in self._states.values():
                if state.sizer is not None:
                    state.sizer.close()
            if self._gpus is not None and self._gpus_tried:
                self._gpus.close()
                self._gpus_tried = False

        return d.addCallback(closed)

    def _tick(self) -> Deferred[None] | None:
        if self._round_running:
            return None  # the previous round (a manual one) still runs: skip this tick
        return self.sample()

    def _when_round_done(self) -> Deferred[None]:
        if not self._round_running:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._round_waiters.append(waiter)
        return waiter

    # -- the public reading side ------------------------------------------------------

    def latest(self, kernel_id: str) -> Sample | None:
        state = self._states.get(kernel_id)
        if state is None or state.latest is None:
            return None
        return dict(state.latest)

    def latest_all(self) -> dict[str, Sample]:
        return {kernel_id: dict(state.latest) for kernel_id, state in self._states.items() if state.latest is not None}

    def node_latest(self) -> Sample | None:
        return None if self._node_latest is None else dict(self._node_latest)

    def add_round_listener(self, listener: Callable[[], object]) -> None:
        """Call ``listener()`` after each round, once its samples are stored; its exceptions are logged."""
        self._round_listeners.append(listener)

    def forget(self, kernel_id: str) -> None:
        """The kernel ended: drop what the collector keeps about it."""
        state = self._states.pop(kernel_id, None)
        if state is None:
            return
        if state.sizer is not None:
            state.sizer.close()
        forget = getattr(self._cgroups, "forget", None)
        if forget is not None:
            forget(state.container_id)

    # -- rounds -----------------------------------------------------------------------

    def sample(self) -> Deferred[None]:
        """
        One full round now (kernels, node, GPUs); fires with None when it is done, never
        with a failure. While a round runs, a call waits for that round instead.
        """
        if self._round_running:
            return self._when_round_done()
        self._round_running = True
        d = maybeDeferred(self._start_round)
        d.addErrback(lambda failure: log.failure("a statistics round failed", failure))
        d.addBoth(self._round_done)
        return d

    def _round_done(self, _: object) -> None:
        self._round_running = False
        waiters, self._round_waiters = self._round_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        return None

    def _start_round(self) -> Deferred[None]:
        entries = [(target, self._state_for(target)) for target in self._targets()]
        d = self._run_blocking(self._read_round, entries)
        d.addCallback(self._finish_round, entries)
        return d

    def _targets(self) -> list[KernelTarget]:
        try:
            targets = list(self._kernels())
        except Exception:
            log.failure("could not list the kernels to sample")
            return []
        valid = []
        for target in targets:
            kernel_id = getattr(target, "kernel_id", None)
            container_id = getattr(target, "container_id", None)
            if not isinstance(kernel_id, str) or not kernel_id:
                log.warn("statistics: ignoring a kernel target without a kernel id: {target!r}", target=target)
                continue
            if not isinstance(container_id, str) or not container_id:
                continue  # no container yet (creating): nothing to read
            valid.append(target)
        return valid

    def _state_for(self, target: KernelTarget) -> _KernelState:
        state = self._states.get(target.kernel_id)
        if state is not None and state.container_id != target.container_id:
            # A new container for the same kernel (restart): fresh counters, fresh baseline.
            forget = getattr(self._cgroups, "forget", None)
            if forget is not None:
                forget(state.container_id)
            state.container_id = target.container_id
            state.previous_cpu_ns = state.previous_at = None
        if state is None:
            sizer = self._sizer_factory(target.scratch_dir) if target.scratch_dir else None
            state = self._states[target.kernel_id] = _KernelState(target, sizer)
        return state

    def _read_kernel(self, container_id: str, state: _KernelState) -> _Reading:
        """In the worker thread: ``(raw or None or the exception, read time, scratch bytes or None)``."""
        try:
            raw = self._cgroups.read(container_id)
        except Exception as error:
            return error, self._clock.seconds(), None
        # The reactor's seconds() is plain time.time(), safe from any thread; with a
        # test Clock the thread is the test's own.
        at = self._clock.seconds()
        scratch: int | None = None
        if raw is not None and state.sizer is not None:
            try:
                scratch = state.sizer.step()
            except Exception as error:
                return error, at, None
        return raw, at, scratch

    def _read_round(self, entries: list[tuple[KernelTarget, _KernelState]]) -> _RoundReadings:
        """In the worker thread: every reading of one round, and its CPU time."""
        started = time.thread_time()
        kernels = [self._read_kernel(target.container_id, state) for target, state in entries]
        node: Sample | None = None
        gpus: list[Sample] | None = None
        node_error: Exception | None = None
        gpus_error: str | None = None
        if self._node is not None:
            try:
                node = self._node.sample()
            except Exception as error:
                node_error = error
        if self._gpus is not None:
            try:
                if not self._gpus_tried:
                    self._gpus_tried = True
                    if not self._gpus.open() and getattr(self._gpus, "open_error", None):
                        gpus_error = f"no GPU statistics: NVML did not initialise: {self._gpus.open_error}"
                gpus = self._gpus.sample()
            except Exception as error:
                gpus_error = f"GPU statistics failed: {type(error).__name__}: {error}"
                gpus = []
        node_at = self._clock.seconds()
        return kernels, node, node_error, gpus, gpus_error, node_at, time.thread_time() - started

    def _finish_round(self, result: _RoundReadings, entries: list[tuple[KernelTarget, _KernelState]]) -> None:
        kernels, node, node_error, gpus, gpus_error, node_at, cpu_seconds = result
        for (target, state), reading in zip(entries, kernels):
            if self._states.get(target.kernel_id) is not state:
                continue  # forgotten while the round ran
            self._absorb(target, state, *reading)
        self._log_reader_problems()
        if node_error is not None:
            log.warn("node statistics failed: {error}", error=f"{type(node_error).__name__}: {node_error}")
        if gpus_error is not None:
            log.warn("{error}", error=gpus_error)
        if self._node is not None or self._gpus is not None:
            latest: Sample = {samples.SAMPLED_AT: node_at}
            if node is not None:
                latest.update(node)
            latest[samples.NODE_GPUS] = gpus or []
            self._node_latest = latest
        self.sample_seconds = cpu_seconds
        self.rounds += 1
        for listener in list(self._round_listeners):
            try:
                listener()
            except Exception:
                log.failure("statistics round listener {listener!r} failed", listener=listener)

    def _absorb(
        self,
        target: KernelTarget,
        state: _KernelState,
        raw: Mapping[str, Any] | Exception | None,
        at: float,
        scratch: int | None,
    ) -> Sample | None:
        """Turn one reading into a sample (reactor thread); the sample, or None."""
        if isinstance(raw, Exception):
            if not state.failing:
                state.failing = True
                log.warn(
                    "statistics of kernel {kernel_id} failed: {error}",
                    kernel_id=target.kernel_id,
                    error=f"{type(raw).__name__}: {raw}",
                )
            return None
        if raw is None:
            return None  # no cgroup (not started yet, or gone)
        state.failing = False
        if state.previous_at is not None and at <= state.previous_at:
            # An older reading finishing after a newer one: tell it, do not store it.
            return self._make_sample(state, raw, at, scratch, util=0.0)
        util = 0.0
        cpu_ns = raw["cpu_used_ns"]
        if state.previous_at is not None and cpu_ns >= state.previous_cpu_ns:
            util = (cpu_ns - state.previous_cpu_ns) / 1e9 / (at - state.previous_at) * 100.0
        state.previous_cpu_ns, state.previous_at = cpu_ns, at
        state.mem_max = max(state.mem_max, int(raw["mem_max_bytes"]), int(raw["mem_bytes"]))
        if scratch is not None:
            state.scratch_bytes = scratch
        sample = self._make_sample(state, raw, at, scratch, util)
        state.latest = sample
        return sample

    @staticmethod
    def _make_sample(
        state: _KernelState, raw: Mapping[str, Any], at: float, scratch: int | None, util: float
    ) -> Sample:
        sample: Sample = {
            samples.CPU_USED_MS: int(raw["cpu_used_ns"]) // 1_000_000,
            samples.CPU_UTIL: round(util, 1),
            samples.MEM_MAX_BYTES: max(state.mem_max, int(raw["mem_max_bytes"]), int(raw["mem_bytes"])),
            samples.SCRATCH_BYTES: int(scratch if scratch is not None else state.scratch_bytes),
            samples.SAMPLED_AT: float(at),
        }
        for key in _COUNTERS:
            sample[key] = int(raw[key])
        return {key: sample[key] for key in SAMPLE_KEYS}

    def _log_reader_problems(self) -> None:
        drain = getattr(self._cgroups, "drain_problems", None)
        if drain is None:
            return
        for container_id, problem in drain():
            log.warn("statistics of container {container_id}: {problem}", container_id=container_id, problem=problem)

    # -- one kernel, now --------------------------------------------------------------

    def sample_kernel(self, target: KernelTarget) -> Deferred[Sample]:
        """
        A fresh sample of one kernel (right before its container is removed); fires with
        the latest sample when the cgroup is already gone or the reading fails, and with
        a sample of zeros when the kernel was never sampled. Never fails.
        """
        container_id = getattr(target, "container_id", None)
        if not isinstance(container_id, str) or not container_id:
            # No container (it was never created): nothing to read, only what we have.
            kernel_id: Any = getattr(target, "kernel_id", None)  # what a caller passed, unchecked
            state = self._states.get(kernel_id)
            latest = None if state is None else state.latest
            return succeed(dict(latest) if latest is not None else empty_sample(self._clock.seconds()))
        try:
            state = self._state_for(target)
        except Exception:
            log.failure("statistics: bad kernel target {target!r}", target=target)
            return succeed(empty_sample(self._clock.seconds()))

        def absorbed(reading: _Reading) -> Sample | None:
            sample = None
            if self._states.get(target.kernel_id) is state:
                sample = self._absorb(target, state, *reading)
            self._log_reader_problems()
            return sample

        def fallback(sample: Sample | None) -> Sample:
            if sample is not None:
                return dict(sample)
            if state.latest is not None:
                return dict(state.latest)
            return empty_sample(self._clock.seconds())

        d = maybeDeferred(self._run_blocking, self._read_kernel, target.container_id, state)
        d.addCallback(absorbed)
        d.addErrback(
            lambda failure: log.failure("statistics of kernel {kernel_id} failed", failure, kernel_id=target.kernel_id)
        )
        d.addCallback(fallback)
        return d
