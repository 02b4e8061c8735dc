"""
The narrow view of the Docker Engine API the agent depends on.

Two implementations: ``bai_agent.docker.engine.DockerEngineClient`` (the real daemon,
over treq) and ``bai_agent.testing.fake_docker.FakeDockerBackend``; one contract test
suite (``bai_agent.testing.docker_contract``) runs against both.
"""

from typing import Optional

from zope.interface import Attribute, Interface


class DockerError(Exception):
    """
    The Docker daemon answered with an error status, or could not be reached.

    ``status`` is the HTTP status (``None`` when the daemon was unreachable), ``message``
    the daemon's own message.
    """

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class DockerUnavailable(DockerError):
    """The daemon could not be reached at all (socket missing, refused, timed out)."""


class DockerNotFound(DockerError):
    """The daemon answered 404: no such image / container."""


class DockerConflict(DockerError):
    """
    The daemon answered 409: the request clashes with the object's state (a container
    name already in use, killing a container that is not running, removing a running
    container without ``force``, a removal already in progress, an update the current
    limits forbid).
    """


class IDockerBackend(Interface):
    """
    Every method returns a Deferred and never blocks the reactor thread. Failures are
    ``DockerError`` (or a subclass); nothing else escapes, except a ``CancelledError``
    when the caller cancels the Deferred.

    Container methods take ``container_id``: a full or unique-prefix id, or a name.
    A container that does not exist fails with ``DockerNotFound``. Errors keep the
    daemon's own ``message``.

    OOM kills: Docker 20.10 on cgroup v1 reports them through the ``oom`` container
    event and ``State.OOMKilled``, but not reliably when the host is busy: with several
    containers dying of OOM at once the ``oom`` event sometimes came after ``die``
    (up to ~200 ms) and then ``OOMKilled`` stayed false, or no ``oom`` event came at
    all (about 1 in 11 with 8 at once, 1 in 60 with 4, none in 90 one at a time). The
    exit code, 137, was always right: treat exit 137 of a memory-limited container
    that nobody killed as an OOM kill, and an ``oom`` event soon after ``die`` too.
    """

    api_version = Attribute("The negotiated Engine API version, e.g. '1.41' (None before).")

    def negotiate():
        """
        Ask the daemon for its version and pick the API version to speak: the daemon's
        ``ApiVersion`` capped by the client's maximum. Fires with the daemon's version
        dict. A daemon older than API 1.41 fails with ``DockerError``.
        """

    def ping():
        """Fire with None when ``/_ping`` answers OK."""

    def list_images():
        """
        Fire with a list of image summaries as the Engine API's ``GET /images/json``
        returns them (dicts with ``Id``, ``RepoTags``, ``Labels``, ...).
        """

    def inspect_image(name):
        """
        Fire with the ``GET /images/{name}/json`` document; ``DockerNotFound`` if absent.
        """

    def pull_image(reference, auth, on_progress):
        """
        ``POST /images/create?fromImage=reference`` (a checked ``name:tag`` or
        ``name@digest``) with ``auth`` (the ``X-Registry-Auth`` value, or None), read to
        its end: ``on_progress`` is called with each progress message (dicts with
        ``status``, ``id``, ``progressDetail``). Returns an ``IEventStream`` at once; its
        ``done`` fires with None once the image is pulled, and fails with
        ``DockerError`` (``DockerNotFound`` for a 404) with the daemon's or the
        registry's message, whether the daemon refused at once or said so inside the
        stream (a failed pull is answered 200). ``cancel`` drops the request.
        """

    def remove_image(name):
        """
        ``DELETE /images/{name}`` (without force: a tag of several is only untagged).
        ``DockerNotFound`` when there is no such image; ``DockerConflict`` when a
        container uses it.
        """

    def stream_events(on_event, filters=None):
        """
        Open the ``GET /events`` stream. ``on_event`` is called with each decoded event
        dict, in order. Returns an ``IEventStream`` at once; its ``done`` Deferred fires
        (with None) when the daemon closes the stream, or fails with ``DockerError``
        when it could not be opened or broke.
        """

    # -- containers ------------------------------------------------------------------

    def create_container(name, config):
        """
        ``POST /containers/create?name=...``: create (not start) a container named
        ``name`` (``None``: the daemon picks one) from ``config``, the Engine API's
        create body as-is (``Image``, ``Cmd``, ``Env``, ``Labels``, ``User``,
        ``WorkingDir``, ``Tty``, ``HostConfig``: {``NetworkMode``, ``Memory``, ...}).
        Fires with the new container's id. A name in use fails with
        ``DockerConflict``; a missing image with ``DockerNotFound``; an invalid name or
        config with ``DockerError`` (status 400).
        """

    def start_container(container_id):
        """Start the container; fires with None (also when it was already running)."""

    def inspect_container(container_id):
        """Fire with the ``GET /containers/{id}/json`` document (``State``, ``Config``, ...)."""

    def list_containers(labels=None, all=True):
        """
        Fire with the container summaries of ``GET /containers/json`` (dicts with
        ``Id``, ``Names``, ``Image``, ``State``, ``Labels``, ...). ``labels`` keeps the
        containers that carry every label given: ``{key: value}`` matches the value,
        ``{key: None}`` only the presence of the key. ``all=False`` lists only running
        containers.
        """

    def kill_container(container_id, signal="SIGKILL"):
        """
        Send ``signal`` (a name such as ``"SIGTERM"`` or a number) to the container's
        main process; fires with None once sent. A container that is not running fails
        with ``DockerConflict``; an unknown signal with ``DockerError`` (status 400).
        """

    def stop_container(container_id, timeout=10):
        """
        Send the stop signal (SIGTERM unless the image says otherwise), and SIGKILL
        after ``timeout`` seconds; fires with None once the container has stopped (also
        when it was not running).
        """

    def remove_container(container_id, force=True, volumes=True):
        """
        Remove the container (``force``: kill it first when running; ``volumes``: its
        anonymous volumes too). ``DockerNotFound`` when it does not exist;
        ``DockerConflict`` when it is running and ``force`` is false, or when a removal
        is already in progress.
        """

    def wait_container(container_id):
        """
        Fire with the container's exit code once it is not running
        (``POST /containers/{id}/wait?condition=not-running``): at once for a container
        that has exited (its last exit code) or was never started (0). There is no
        time limit: cancel the Deferred to stop waiting.
        """

    def container_logs(container_id, tail=None):
        """
        Fire with the container's output so far, stdout and stderr interleaved in the
        order the daemon logged them, as text (UTF-8, undecodable bytes replaced).
        ``tail``: only the last ``tail`` lines (``None``: all).

        The daemon reads stdout and stderr concurrently and logs long lines in 16 KiB
        pieces, so the order across the two streams is the order of logging, not
        strictly of writing; lines are kept whole (a line goes where its last byte was
        logged), never torn by the other stream. A container with a TTY has one stream:
        its raw terminal output (CRLF line ends) comes back as it is.
        """

    def read_file(container_id, path, max_bytes):
        """
        Fire with the bytes of the regular file at ``path`` in the container's own file
        system, as Docker resolves it there (``GET /containers/{id}/archive``): symlinks
        inside the container never lead to the host's files. ``DockerNotFound`` when the
        container or the file does not exist; ``DockerError`` when it is not a regular
        file or is larger than ``max_bytes`` (nothing larger is read).
        """

    def rename_container(container_id, name):
        """
        ``POST /containers/{id}/rename?name=...``; fires with None. A name in use fails
        with ``DockerConflict``; a missing container with ``DockerNotFound``.
        """

    def update_container(container_id, resources):
        """
        ``POST /containers/{id}/update`` with ``resources`` (``Memory``,
        ``MemorySwap``, ``CpuQuota``, ``NanoCpus``, ``PidsLimit``, ...) as the Engine
        API's body. Fires with the daemon's list of warnings (possibly empty). Limits
        that the current ones forbid fail with ``DockerConflict``.
        """


class IEventStream(Interface):
    done = Attribute("Deferred: fires when the stream ends, fails when it broke.")

    def cancel():
        """Close the stream; ``done`` then fires with None."""
