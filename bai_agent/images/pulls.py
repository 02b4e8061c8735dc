"""
Pulls of images from registries (docs/protocol.md section 8), shared: every ``CreateKernel``
and ``PullImage`` that needs one reference while it is being pulled waits for the same
pull, and a waiter that goes away (a kernel destroyed while it waits) leaves the pull
going for the others.

Each pull reads Docker's progress stream to its end (a failed pull is answered 200 with
the error inside it), journals ``image-pulling``, ``image-pull-progress`` (bytes, at most
once a second), then ``image-pulled`` or ``image-pull-failed``, and is aborted after
``timeout`` seconds, or after ``stall_timeout`` seconds without progress. Docker's and the
registry's messages are mapped to ``IMAGE_NOT_FOUND``, ``REGISTRY_AUTH_FAILED`` or
``IMAGE_PULL_FAILED`` (with the message, the password scrubbed from it).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from bai_agent.docker.images import KernelImage, kernel_image_from_inspect
from bai_agent.docker.interface import DockerError, DockerNotFound, DockerUnavailable
from bai_agent.images.credentials import Credentials, scrub
from bai_agent.images.references import ImageReference
from bai_agent.protocol import errors, events

if TYPE_CHECKING:
    from bai_agent.docker.service import DockerService

__all__ = ["ImagePulls", "Pull", "pull_error"]

DEFAULT_TIMEOUT = 1800.0
DEFAULT_STALL_TIMEOUT = 120.0
PROGRESS_INTERVAL = 1.0
MAX_MESSAGE = 2000

log = Logger()

_AUTH_MARKERS = ("no basic auth credentials", "unauthorized", "authentication required", "denied", "401")
_NOT_FOUND_MARKERS = ("manifest unknown", "not found", "name unknown", "does not exist")


def pull_error(error: Exception, reference: str, credentials: Credentials | None) -> errors.AgentError:
    """The declared error for a pull that failed with ``error`` (a ``DockerError``)."""
    message = scrub(str(error), credentials)[:MAX_MESSAGE]
    lowered = message.lower()
    if any(marker in lowered for marker in _AUTH_MARKERS):
        return errors.RegistryAuthFailed(f"the registry refused to let {reference} be pulled: {message}")
    if isinstance(error, DockerNotFound) or any(marker in lowered for marker in _NOT_FOUND_MARKERS):
        return errors.ImageNotFound(f"the registry has no image {reference}: {message}")
    return errors.ImagePullFailed(f"pulling {reference} failed: {message}")


class Pull:
    """One pull under way, and who waits for it."""

    def __init__(self, reference: ImageReference, started_at: float) -> None:
        self.reference = reference
        self.started_at = started_at
        self.waiters: list[Deferred[KernelImage | None]] = []
        self.layers: dict[str, tuple[int, int]] = {}  # layer id -> (bytes downloaded, bytes in all)
        self.last_progress_at = started_at
        self.last_event_at = float("-inf")  # the first progress is told at once
        self.stream: Any = None
        self.timers: list[Any] = []
        self.ended: str | None = None  # why it was aborted, once it was

    @property
    def bytes_done(self) -> int:
        return sum(done for done, _ in self.layers.values())

    @property
    def bytes_total(self) -> int:
        return sum(total for _, total in self.layers.values())

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "image": str(self.reference),
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "waiting": len(self.waiters),
            "elapsed": round(now - self.started_at, 3),
        }


class ImagePulls:
    """
    :param clock: ``IReactorTime``: the timeouts, and the events' pacing.
    :param backend: the ``IDockerBackend`` that pulls.
    :param docker: the ``DockerService`` (its images, re-listed after a pull).
    :param journal: the ``EventJournal``.
    :param credentials: ``registry -> Deferred[Credentials | None]``: the operator's (etcd).
    :param timeout: seconds a pull may take (``--image-pull-timeout``).
    :param stall_timeout: seconds a pull may go without progress (``--image-pull-stall-timeout``).
    """

    def __init__(
        self,
        clock: Any,
        backend: Any,
        docker: DockerService,
        journal: Any,
        credentials: Callable[[str], Deferred[Credentials | None]],
        timeout: float = DEFAULT_TIMEOUT,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    ) -> None:
        self.clock = clock
        self.backend = backend
        self.docker = docker
        self.journal = journal
        self.credentials = credentials
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        self._pulls: dict[str, Pull] = {}

    def stop(self) -> None:
        """Abort every pull (the agent stops); their waiters fail."""
        for pull in list(self._pulls.values()):
            self._abort(pull, "the agent is stopping")

    def in_progress(self) -> list[dict[str, Any]]:
        """The pulls under way (the status page's), oldest first."""
        now = self.clock.seconds()
        return [pull.describe(now) for pull in sorted(self._pulls.values(), key=lambda p: p.started_at)]

    def pull(self, reference: ImageReference, credentials: Credentials | None = None) -> Deferred[KernelImage | None]:
        """
        Wait for ``reference`` to be pulled (a pull under way is joined); fires with its
        ``KernelImage``, or None when the image is not a kernel image (it is kept).
        Cancelling the Deferred stops the waiting, not the pull.
        """
        key = str(reference)
        pull = self._pulls.get(key)
        starting = pull is None
        if pull is None:
            pull = self._pulls[key] = Pull(reference, self.clock.seconds())

        def forget(waiter: Deferred[Any]) -> None:
            if waiter in pull.waiters:
                pull.waiters.remove(waiter)

        waiter: Deferred[KernelImage | None] = Deferred(forget)
        pull.waiters.append(waiter)
        if starting:
            self.journal.append(events.IMAGE_PULLING, None, {"image": key})
            log.info("pulling {image}", image=key)
            self._run(pull, credentials).addErrback(
                lambda failure: log.failure("the pull of {image} went wrong", failure, image=key)
            )
        return waiter

    # -- inside --------------------------------------------------------------------------

    @inlineCallbacks
    def _run(self, pull: Pull, given: Credentials | None) -> Generator[Deferred[Any], Any, None]:
        key = str(pull.reference)
        credentials = given
        result: Any
        try:
            if credentials is None:
                credentials = yield self.credentials(pull.reference.registry)
            header = None if credentials is None else credentials.header(pull.reference.registry)
            pull.stream = self.backend.pull_image(key, header, lambda message: self._progress(pull, message))
            pull.timers = [
                self.clock.callLater(self.timeout, self._abort, pull, f"it took more than {self.timeout:g}s"),
                self.clock.callLater(self._stall_interval(), self._check_stall, pull),
            ]
            try:
                yield pull.stream.done
            finally:
                for call in pull.timers:
                    if call.active():
                        call.cancel()
            if pull.ended is not None:
                raise DockerError(f"aborted: {pull.ended}")
            image, image_id = yield self._pulled_image(key)
            result = image
            elapsed = round(self.clock.seconds() - pull.started_at, 3)
            self.journal.append(events.IMAGE_PULLED, None, {"image": key, "id": image_id, "elapsed": elapsed})
            log.info("pulled {image} in {elapsed}s", image=key, elapsed=elapsed)
        except Exception as e:
            if isinstance(e, errors.AgentError):
                error = e
            elif isinstance(e, DockerUnavailable) and pull.ended is None:
                error = errors.ImagePullFailed(f"pulling {key} failed: {scrub(str(e), credentials)[:MAX_MESSAGE]}")
            else:
                error = pull_error(e, key, credentials)
            self.journal.append(events.IMAGE_PULL_FAILED, None, {"image": key, "error": str(error)})
            log.warn("pulling {image} failed: {error}", image=key, error=str(error))
            result = error
        finally:
            del self._pulls[key]
        waiters, pull.waiters = pull.waiters, []
        for waiter in waiters:
            if isinstance(result, Exception):
                waiter.errback(result)
            else:
                waiter.callback(result)

    @inlineCallbacks
    def _pulled_image(self, key: str) -> Generator[Deferred[Any], Any, tuple[KernelImage | None, str | None]]:
        """The pulled image as a ``KernelImage`` (None when it is not one) once Docker lists it, and its id."""
        yield self.docker.refresh_images()
        for image in self.docker.images:
            if image.name == key:
                return image, image.id
        try:
            document = yield self.backend.inspect_image(key)
        except DockerNotFound:
            raise errors.ImagePullFailed(f"{key} was pulled, but Docker does not have it") from None
        # A digest reference is not a tag: Docker lists the image under its tags only.
        image_id = document.get("Id") if isinstance(document, dict) else None
        return kernel_image_from_inspect(key, document), image_id

    def _progress(self, pull: Pull, message: Any) -> None:
        if not isinstance(message, dict):
            return
        layer, status = message.get("id"), str(message.get("status") or "")
        raw_detail = message.get("progressDetail")
        detail: dict[str, Any] = raw_detail if isinstance(raw_detail, dict) else {}
        now = self.clock.seconds()
        if isinstance(layer, str) and status.startswith(("Downloading", "Pulling fs layer", "Download complete")):
            done, total = pull.layers.get(layer, (0, 0))
            current, size = detail.get("current"), detail.get("total")
            if isinstance(size, int) and size > 0:
                total = size
            if isinstance(current, int) and current >= done:
                done = current
            if status.startswith("Download complete"):
                done = total
            if (done, total) != pull.layers.get(layer):
                pull.layers[layer] = (done, total)
                pull.last_progress_at = now
        elif status.startswith(("Extracting", "Verifying", "Pull complete", "Already exists", "Digest", "Status")):
            pull.last_progress_at = now
        if now - pull.last_event_at >= PROGRESS_INTERVAL and pull.layers:
            pull.last_event_at = now
            self.journal.append(
                events.IMAGE_PULL_PROGRESS,
                None,
                {"image": str(pull.reference), "bytes_done": pull.bytes_done, "bytes_total": pull.bytes_total},
            )

    def _stall_interval(self) -> float:
        return max(0.1, min(self.stall_timeout / 4, 10.0))

    def _check_stall(self, pull: Pull) -> None:
        if pull.stream is None or pull.stream.done.called:
            return
        if self.clock.seconds() - pull.last_progress_at >= self.stall_timeout:
            self._abort(pull, f"no progress for {self.stall_timeout:g}s")
            return
        pull.timers.append(self.clock.callLater(self._stall_interval(), self._check_stall, pull))

    def _abort(self, pull: Pull, why: str) -> None:
        if pull.stream is not None and not pull.stream.done.called:
            pull.ended = why
            pull.stream.cancel()
