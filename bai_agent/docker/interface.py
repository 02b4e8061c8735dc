"""
The narrow view of the Docker Engine API the agent depends on.

Two implementations: ``bai_agent.docker.engine.DockerEngineClient`` (the real daemon,
over treq) and ``bai_agent.testing.fake_docker.FakeDockerBackend``; one contract test
suite (``bai_agent.testing.docker_contract``) runs against both.
"""

from zope.interface import Attribute, Interface


class DockerError(Exception):
    """
    The Docker daemon answered with an error status, or could not be reached.

    ``status`` is the HTTP status (``None`` when the daemon was unreachable), ``message``
    the daemon's own message.
    """

    def __init__(self, message, status=None):
        super().__init__(message)
        self.message = message
        self.status = status


class DockerUnavailable(DockerError):
    """The daemon could not be reached at all (socket missing, refused, timed out)."""


class DockerNotFound(DockerError):
    """The daemon answered 404: no such image / container."""


class IDockerBackend(Interface):
    """
    Every method returns a Deferred and never blocks the reactor thread. Failures are
    ``DockerError`` (or a subclass); nothing else escapes.
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

    def stream_events(on_event, filters=None):
        """
        Open the ``GET /events`` stream. ``on_event`` is called with each decoded event
        dict, in order. Returns an ``IEventStream`` at once; its ``done`` Deferred fires
        (with None) when the daemon closes the stream, or fails with ``DockerError``
        when it could not be opened or broke.
        """


class IEventStream(Interface):
    done = Attribute("Deferred: fires when the stream ends, fails when it broke.")

    def cancel():
        """Close the stream; ``done`` then fires with None."""
