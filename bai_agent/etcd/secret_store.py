"""
The namespace secret (PROTOCOL.md section 1): where the agent gets it, and who hears of a new
one.

Three sources, in this order of authority: the operator's ``--secret-file`` (read once at
construction, before the reactor runs; etcd's copy is then never adopted nor written), the
value at ``config/agent/secret`` in etcd (offered with create-if-absent, so the first agent
bootstraps it), and the cached copy under the state directory (offered when etcd lost its
data, so that managers keep the secret they know). Reading and writing the cache go through
``run_blocking``, off the reactor thread.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks, maybeDeferred
from twisted.logger import Logger

from bai_agent.etcd.interface import IEtcd
from bai_agent.protocol.auth import is_valid_secret, read_secret_file
from bai_agent.runtime.inflight import InFlight

# ``run_blocking(function, *args)``: a Deferred of ``function(*args)``, run off the reactor
# thread (``deferToThreadPool``), or inline where blocking does not matter (tests).
RunBlocking = Callable[..., "Deferred[Any]"]
SecretListener = Callable[[str], object]


def run_inline(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """A ``run_blocking`` that blocks: ``function(*args)`` at once, on the calling thread."""
    return maybeDeferred(function, *args)


class InvalidSecret(ValueError):
    """A secret that is not hex of at least 64 digits (32 bytes of entropy)."""


def write_secret_cache(path: str, secret: str) -> None:
    """Write ``secret`` to ``path`` atomically, readable by the owner only. Blocking."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".secret-", dir=directory)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as cache:
            cache.write(secret + "\n")
            cache.flush()
            os.fsync(cache.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def read_secret_cache(path: str) -> tuple[str | None, str | None]:
    """
    ``(secret, None)`` from the cache at ``path``, ``(None, None)`` when there is none, or
    ``(None, why)`` when it cannot be used. Blocking; logs nothing, so it can run in a thread.
    """
    if not os.path.exists(path):
        return None, None
    try:
        with open(path, encoding="utf-8") as cache:
            text = cache.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        return None, f"cannot read the secret cache {path}: {error}"
    if not is_valid_secret(text):
        return None, f"ignoring the invalid secret cache {path}"
    return text, None


def sync_secret_cache(path: str, secret: str) -> bool:
    """Write ``secret`` to the cache at ``path`` unless it holds it already; whether it wrote."""
    cached, _problem = read_secret_cache(path)
    if cached == secret:
        return False
    write_secret_cache(path, secret)
    return True


class SecretStore:
    """
    The namespace secret of one agent: ``secret`` (None until known), the listeners told of
    each change, and the cache kept in step with it.
    """

    log = Logger()

    def __init__(
        self,
        etcd: IEtcd,
        secret_key: bytes,
        secret_file: str | None = None,
        cache_path: str | None = None,
        run_blocking: RunBlocking = run_inline,
    ) -> None:
        self._etcd = etcd
        self.secret_key = secret_key
        self.from_file = secret_file is not None
        # At construction, before the reactor runs: a bad file fails start-up loudly.
        self.secret: str | None = read_secret_file(secret_file) if secret_file is not None else None
        self._cache_path = cache_path
        self._run_blocking = run_blocking
        self._listeners: list[SecretListener] = []
        self._cache_lock = DeferredLock()  # cache writes land in the order of the changes
        self.in_flight = InFlight()

    def add_listener(self, callback: SecretListener) -> None:
        """Call ``callback(secret)`` each time the namespace secret changes to another one."""
        self._listeners.append(callback)

    def _key_text(self) -> str:
        return self.secret_key.decode("utf-8")

    @inlineCallbacks
    def _cached_secret(self) -> Generator[Deferred[Any], Any, str | None]:
        path = self._cache_path
        if path is None:
            return None
        cached, problem = yield self._run_blocking(read_secret_cache, path)
        if problem is not None:
            self.log.warn("{problem}", problem=problem)
        return cached  # type: ignore[no-any-return]

    @inlineCallbacks
    def bootstrap(self) -> Generator[Deferred[Any], Any, None]:
        """
        Offer the secret known so far (or a new one) with create-if-absent; the value etcd
        keeps is the namespace's secret. ``InvalidSecret`` when etcd keeps a bad one.
        """
        if self.from_file:
            return
        offered = self.secret or (yield self._cached_secret()) or secrets.token_hex(32)
        stored: bytes = yield self._etcd.put_if_absent(self.secret_key, offered.encode("ascii"))
        text = stored.decode("utf-8", "replace")
        if not is_valid_secret(text):
            raise InvalidSecret(f"the secret at {self._key_text()} is not hex of at least 64 digits; not adopting it")
        if stored == offered.encode("ascii") and offered != self.secret:
            self.log.info("offered the namespace secret at {key}", key=self._key_text())
        yield self._adopt(text)

    def changed(self, value: bytes | None) -> bool:
        """
        The watched key changed to ``value``: adopt a valid new secret. False when the key
        was deleted (the caller writes it back with ``bootstrap``), True otherwise.
        """
        if self.from_file:
            return True
        if value is None:
            return False
        text = value.decode("utf-8", "replace")
        if not is_valid_secret(text):
            self.log.error(
                "the secret at {key} is not hex of at least 64 digits; keeping the previous one",
                key=self._key_text(),
            )
            return True
        self._adopt(text).addErrback(lambda failure: self.log.failure("cannot keep the secret cache", failure))
        return True

    def _adopt(self, text: str) -> Deferred[None]:
        """Take ``text`` as the secret, tell the listeners; fires once the cache has it."""
        if text != self.secret:
            self.log.info("adopted the namespace secret from {key}", key=self._key_text())
            self.secret = text
            for listener in list(self._listeners):
                try:
                    listener(text)
                except Exception:
                    self.log.failure("secret listener {listener!r} failed", listener=listener)
        path = self._cache_path
        if path is None:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        return self.in_flight.track(self._cache_lock.run(self._sync_cache, path, text))

    def _sync_cache(self, path: str, text: str) -> Deferred[None]:
        def failed(failure: Any) -> None:
            error = failure.trap(OSError) and failure.value
            self.log.error("cannot write the secret cache {path}: {error}", path=path, error=error)

        d = self._run_blocking(sync_secret_cache, path, text)
        d.addCallbacks(lambda _: None, failed)
        return d
