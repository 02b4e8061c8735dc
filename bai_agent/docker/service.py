"""
``DockerService``: the agent's live view of the Docker daemon.

It connects (negotiate + ping) with capped exponential backoff while the daemon is away,
keeps the events stream open and fans its events out to subscribers, and keeps the list
of local kernel images current (at start, every ``relist_interval`` seconds, and on
every image event). ``healthy`` and ``last_error`` say how things stand right now.
"""

from __future__ import annotations

import random as _random
from collections.abc import Generator
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from bai_agent.docker.images import KernelImage, kernel_images_from_inspect
from bai_agent.docker.interface import DockerError, DockerNotFound, DockerUnavailable, IEventStream
from bai_agent.runtime.backoff import Backoff
from bai_agent.runtime.inflight import InFlight
from bai_agent.runtime.periodic import PeriodicService

log = Logger()


class _CachedImage:
    """An inspected image, and the kernel images derived from it for one set of tags."""

    def __init__(self, doc: dict[str, Any], tags: tuple[str, ...]) -> None:
        self.doc = doc
        self.tags = tags
        self.kernel_images = kernel_images_from_inspect([dict(doc, RepoTags=list(tags))])


class DockerService(Service):
    """
    :param reactor: ``IReactorTime`` for the backoff and relist timers.
    :param backend: an ``IDockerBackend``; closed on stop when it has ``close()``.
    :param relist_interval: seconds between image re-lists.
    :param random: a ``random.random``-like callable, for the backoff jitter.

    Read-only state: ``healthy`` (bool), ``last_error`` (str or None), ``images`` (list
    of ``KernelImage``), ``api_version`` and ``daemon_version`` (str, None before the
    first connection).
    """

    #: A stream that stayed open this long resets the backoff when it ends.
    STABLE_STREAM_SECONDS = 30.0

    def __init__(
        self,
        reactor: IReactorTime,
        backend: Any,
        relist_interval: float = 30.0,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self._reactor = reactor
        self._backend = backend
        self._relist_interval = relist_interval
        self._backoff = Backoff(random)
        self.healthy = False
        self.last_error: str | None = None
        self.images: list[KernelImage] = []
        self.api_version: str | None = None
        self.daemon_version: str | None = None
        self._subscribers: list[list[Callable[..., Any]]] = []
        self._connected_listeners: list[list[Callable[..., Any]]] = []
        self._stream: IEventStream | None = None
        self._stream_opened_at = 0.0
        self._retry_call: IDelayedCall | None = None
        self._relist = PeriodicService(reactor, relist_interval, self._relist_round, what="image listing", now=False)
        self._inspected: dict[str, _CachedImage] = {}  # image id -> _CachedImage
        self._refreshing = False
        self._refresh_again = False
        self._refresh_waiters: list[Deferred[list[KernelImage]]] = []
        self._in_flight = InFlight()
        self._stopping = False

    # -- public -----------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Any], object]) -> Callable[[], None]:
        """
        Call ``callback(event)`` with every raw Docker event (dicts, as the daemon sends
        them). Return a callable that unsubscribes. A callback's exception is logged.
        """
        return _add_listener(self._subscribers, callback)

    def on_connected(self, callback: Callable[[], object]) -> Callable[[], None]:
        """
        Call ``callback()`` every time the daemon answers again (at start and after an
        outage), once the events stream is open: events missed meanwhile are only found by
        looking. Return a callable that unsubscribes.
        """
        return _add_listener(self._connected_listeners, callback)

    def refresh_images(self) -> Deferred[list[KernelImage]]:
        """
        Re-list the kernel images now. Fire with ``images`` once a listing that started
        after this call has finished (a listing already under way is followed by one more).
        """
        waiter: Deferred[list[KernelImage]] = Deferred()
        self._refresh_waiters.append(waiter)
        if self._refreshing:
            self._refresh_again = True
        else:
            self._refreshing = True
            self._track(self._refresh_loop())
        return waiter

    # -- IService ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._relist.startService()
        self._track(self._connect())

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        self._stopping = True
        super().stopService()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        relisted = self._relist.stopService()
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.cancel()
        yield relisted
        yield self._in_flight.settled()
        self.healthy = False
        close = getattr(self._backend, "close", None)
        if callable(close):
            try:
                yield maybeDeferred(close)
            except Exception:
                log.failure("closing the Docker client failed")

    # -- connection -------------------------------------------------------------------

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        """Keep ``d`` among the in-flight work that ``stopService`` waits for."""
        self._in_flight.track(d)
        d.addErrback(_log_unexpected)
        return d

    @inlineCallbacks
    def _connect(self) -> Generator[Deferred[Any], Any, None]:
        self._retry_call = None
        try:
            version = yield self._backend.negotiate()
            yield self._backend.ping()
        except Exception as e:
            if not self._stopping:
                self._mark_unhealthy(e)
                self._schedule_connect()
            return
        if self._stopping:
            return
        self.api_version = self._backend.api_version
        self.daemon_version = str(version.get("Version")) if isinstance(version, dict) else None
        self.healthy, self.last_error = True, None
        log.info(
            "Docker {daemon_version} is up (API {api_version})",
            daemon_version=self.daemon_version,
            api_version=self.api_version,
        )
        self._open_stream()
        for (callback,) in list(self._connected_listeners):
            try:
                callback()
            except Exception:
                log.failure("a Docker connection listener failed")
        yield self.refresh_images()

    def _schedule_connect(self) -> None:
        if self._retry_call is not None and self._retry_call.active():
            return
        delay = self._backoff.next_delay()
        log.warn(
            "Docker is unavailable ({error}); retrying in {delay:.1f}s",
            error=self.last_error,
            delay=delay,
        )
        self._retry_call = self._reactor.callLater(delay, lambda: self._track(self._connect()))

    def _mark_unhealthy(self, error: object) -> None:
        self.healthy = False
        self.last_error = _describe(error)

    def _open_stream(self) -> None:
        stream = self._backend.stream_events(self._on_event)
        self._stream = stream
        self._stream_opened_at = self._reactor.seconds()
        stream.done.addBoth(self._stream_ended, stream)

    def _stream_ended(self, result: object, stream: IEventStream) -> None:
        if self._stopping or self._stream is not stream:
            return None  # we closed it ourselves
        self._stream = None
        if isinstance(result, Failure):
            error = result.value
        else:
            error = DockerUnavailable("the events stream was closed")
        self._mark_unhealthy(error)
        if self._reactor.seconds() - self._stream_opened_at >= self.STABLE_STREAM_SECONDS:
            self._backoff.reset()
        self._schedule_connect()
        return None

    def _backend_failed(self, error: object, what: str) -> None:
        """A call failed: a vanished daemon sends us back to reconnecting."""
        self.last_error = f"{what}: {_describe(error)}"
        log.warn("Docker: {what} failed: {error}", what=what, error=_describe(error))
        if isinstance(error, DockerUnavailable):
            self.healthy = False
            stream, self._stream = self._stream, None
            if stream is not None:  # otherwise a reconnection is under way already
                stream.cancel()
                self._schedule_connect()

    # -- events -----------------------------------------------------------------------

    def _on_event(self, event: Any) -> None:
        for (callback,) in list(self._subscribers):
            try:
                result = callback(event)
            except Exception:
                log.failure("a Docker event subscriber failed on {event!r}", event=event)
                continue
            if isinstance(result, Deferred):
                result.addErrback(_log_subscriber_failure, event)
        if isinstance(event, dict) and (event.get("Type") or event.get("type")) == "image":
            self.refresh_images()

    # -- images -----------------------------------------------------------------------

    def _relist_round(self) -> None:
        # The round does not wait for the listing: refresh_images never overlaps two
        # listings, and one asked for during a listing follows it.
        if self.healthy:
            self.refresh_images()

    @inlineCallbacks
    def _refresh_loop(self) -> Generator[Deferred[Any], Any, None]:
        try:
            while True:
                self._refresh_again = False
                waiters, self._refresh_waiters = self._refresh_waiters, []
                try:
                    yield self._refresh_once()
                except Exception:
                    log.failure("listing Docker images failed")
                for waiter in waiters:
                    waiter.callback(self.images)
                if not self._refresh_again or self._stopping:
                    break
        finally:
            self._refreshing = False
            waiters, self._refresh_waiters = self._refresh_waiters, []
            for waiter in waiters:
                waiter.callback(self.images)

    @inlineCallbacks
    def _refresh_once(self) -> Generator[Deferred[Any], Any, None]:
        try:
            summaries = yield self._backend.list_images()
        except DockerError as e:
            self._backend_failed(e, "listing images")
            return
        inspected: dict[str, _CachedImage] = {}
        for summary in summaries or ():
            image_id = summary.get("Id")
            tags = tuple(t for t in summary.get("RepoTags") or () if t != "<none>:<none>")
            if not image_id or not tags:
                continue
            cached = self._inspected.get(image_id)
            if cached is None:
                try:
                    doc = yield self._backend.inspect_image(image_id)
                except DockerNotFound:
                    continue  # removed since the listing
                except DockerError as e:
                    self._backend_failed(e, f"inspecting image {image_id}")
                    return
                cached = _CachedImage(doc, tags)
            elif cached.tags != tags:
                cached = _CachedImage(cached.doc, tags)
            inspected[image_id] = cached
        self._inspected = inspected
        images = [image for cached in inspected.values() for image in cached.kernel_images]
        if images != self.images:
            log.info("kernel images: {names}", names=sorted(image.name for image in images))
        self.images = images
        if self.healthy:
            self.last_error = None


def _add_listener(listeners: list[list[Callable[..., Any]]], callback: Callable[..., Any]) -> Callable[[], None]:
    """Append ``callback`` to ``listeners``; return a callable that removes it (once)."""
    entry = [callback]  # identity, so that the same callback may be added twice

    def remove() -> None:
        if entry in listeners:
            listeners.remove(entry)

    listeners.append(entry)
    return remove


def _log_unexpected(failure: Failure) -> None:
    log.failure("unexpected error in the Docker service", failure)


def _log_subscriber_failure(failure: Failure, event: Any) -> None:
    log.failure("a Docker event subscriber failed on {event!r}", failure, event=event)


def _describe(error: object) -> str:
    if isinstance(error, DockerError):
        return error.message
    return f"{type(error).__name__}: {error}"
