"""
What the kernels offer the rest of the agent, as two narrow interfaces: ``IKernelOperations``
(what the AMP responders do to kernels) and ``IKernelView`` (what the status page, the
metrics and the etcd record read). ``KernelRegistry`` provides both; the composition root
hands each consumer only the one it uses, so a consumer's imports show what it depends on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from bai_agent.kernels.execution import ExecutionSession


class IKernelView(Interface):
    """A read-only look at the kernels, for reports (etcd record, status page, metrics)."""

    taken_over = Attribute("True once the kernels of the last run are adopted or ended")
    allocator = Attribute("The Allocator: capacity (``capacity.as_slots()``) and ``used()`` per slot")

    def records(reveal: bool = True) -> list[dict[str, Any]]:
        """
        The kernels' records (PROTOCOL.md section 5), one dict per kernel, with their
        ``services``; ``reveal`` false hides the tokens in the services' URLs.
        """

    def count() -> int:
        """How many kernels the agent holds."""

    def pool_state() -> dict[str, Any]:
        """The warm pool: ``images`` ({image: {target, ready, filling}}), counters, ``problem``."""

    def pulls_in_progress() -> list[dict[str, Any]]:
        """The image pulls under way: ``{image, bytes_done, bytes_total, waiting, elapsed}``."""

    def relay_totals() -> dict[str, int]:
        """Services running now, and the relays' connections and bytes since the agent started."""


class IKernelOperations(Interface):
    """What managers' commands do to kernels; each returns a Deferred or raises an ``AgentError``."""

    def list_records() -> list[dict[str, Any]]:
        """The records of every kernel (``BACKEND_UNAVAILABLE`` during a take-over)."""

    def create(
        kernel_id: str,
        image: str,
        resources: Any,
        environ: dict[str, str] | None = None,
        mounts: Any = None,
        idle_timeout: int | None = None,
        exec_timeout: int | None = None,
        image_pull: str | None = None,
        registry_auth: Any = None,
    ) -> Deferred[dict[str, Any]]:
        """Create and start a kernel (pulling its image first, as ``image_pull`` says); fires with its record."""

    def pull_image(image: str, registry_auth: Any = None) -> Deferred[dict[str, Any]]:
        """Pull an image (shared with every other pull of it); fires with its ``ListImages`` entry."""

    def remove_image(image: str) -> Deferred[None]:
        """Remove a kernel image no kernel runs."""

    def destroy(kernel_id: str, reason: str = "user-requested") -> Deferred[dict[str, Any]]:
        """Destroy a kernel; fires with its last record (and statistics)."""

    def restart(kernel_id: str) -> Deferred[dict[str, Any]]:
        """Restart a kernel's container, keeping its home; fires with its record."""

    def reset() -> Deferred[int]:
        """Destroy every kernel; fires with how many were destroyed."""

    def session(kernel_id: str) -> ExecutionSession:
        """The runner session of a running kernel (``execute``, ``interrupt``, ``completions``)."""

    def kernel_stats(kernel_id: str) -> Deferred[dict[str, Any]]:
        """Fires with the kernel's latest statistics sample."""

    def upload(kernel_id: str, path: str, data: bytes, append: bool) -> Deferred[int]:
        """Write ``data`` to ``path`` in the kernel's home; fires with the file's size."""

    def download(kernel_id: str, path: str, offset: int, length: int) -> Deferred[tuple[bytes, int, bool]]:
        """Fires with ``(data, size, eof)`` of a read from a file in the kernel's home."""

    def list_files(kernel_id: str, path: str) -> Deferred[list[dict[str, Any]]]:
        """Fires with the entries of a directory in the kernel's home."""

    def logs(kernel_id: str, tail: int | None = None) -> Deferred[str]:
        """Fires with the kernel container's output."""

    def start_service(kernel_id: str, service: str, options: Any = None) -> Deferred[dict[str, Any]]:
        """Start a service the kernel's image declares (or answer its running endpoint); fires with it."""

    def stop_service(kernel_id: str, service: str) -> Deferred[None]:
        """Stop a started service; fires once its relay is closed and its host port released."""

    def list_services(kernel_id: str) -> list[dict[str, Any]]:
        """Every service the kernel's image declares, with its status and endpoint."""
