"""
What the kernels offer the rest of the agent, as two narrow interfaces: ``IKernelOperations``
(what the AMP responders do to kernels) and ``IKernelView`` (what the status page, the
metrics and the etcd record read). ``KernelRegistry`` provides both; the composition root
hands each consumer only the one it uses, so a consumer's imports show what it depends on.
"""

from zope.interface import Attribute, Interface


class IKernelView(Interface):
    """A read-only look at the kernels, for reports (etcd record, status page, metrics)."""

    taken_over = Attribute("True once the kernels of the last run are adopted or ended")
    allocator = Attribute("The Allocator: capacity (``capacity.as_slots()``) and ``used()`` per slot")

    def records() -> list:
        """The kernels' records (PROTOCOL.md section 5), one dict per kernel."""

    def count() -> int:
        """How many kernels the agent holds."""


class IKernelOperations(Interface):
    """What managers' commands do to kernels; each returns a Deferred or raises an ``AgentError``."""

    def list_records() -> list:
        """The records of every kernel (``BACKEND_UNAVAILABLE`` during a take-over)."""

    def create(kernel_id, image, resources, environ=None, mounts=None, idle_timeout=None, exec_timeout=None):
        """Create and start a kernel; fires with its record."""

    def destroy(kernel_id, reason="user-requested"):
        """Destroy a kernel; fires with its last record (and statistics)."""

    def restart(kernel_id):
        """Restart a kernel's container, keeping its home; fires with its record."""

    def reset():
        """Destroy every kernel; fires with how many were destroyed."""

    def session(kernel_id):
        """The runner session of a running kernel (``execute``, ``interrupt``, ``completions``)."""

    def kernel_stats(kernel_id):
        """Fires with the kernel's latest statistics sample."""

    def upload(kernel_id, path, data, append):
        """Write ``data`` to ``path`` in the kernel's home; fires with the file's size."""

    def download(kernel_id, path, offset, length):
        """Fires with ``(data, size)`` of a file in the kernel's home."""

    def list_files(kernel_id, path):
        """Fires with the entries of a directory in the kernel's home."""

    def logs(kernel_id, tail=None):
        """Fires with the kernel container's output."""
