"""
Utilisation and memory of the machine's NVIDIA devices, through NVML.

``GpuStats`` takes the ``pynvml``-like module (``bai_agent.testing.fake_nvml.FakeNvml`` in
tests) and the devices that discovery found (``bai_agent.node.gpus.discover_gpus``).
``open`` initialises NVML once for the agent's lifetime and ``close`` shuts it down;
``sample`` answers one entry per device. NVML calls block (some take milliseconds):
the collector makes them in its worker thread.

Nothing here raises. NVML that does not initialise means no GPU statistics (``[]``); a
device that fails is reported as ``{"index", "uuid", "name", "error"}`` without numbers,
and its handle is looked up again at the next sample (a lost GPU may come back after a
reset). A device whose utilisation NVML does not support (MIG instances, some older
boards) keeps its memory numbers with ``util_percent`` ``None``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.logger import Logger

from bai_agent.node.gpus import GpuDevice, Nvml, describe_nvml_error, nvml_text
from bai_agent.protocol import samples

log = Logger()


class GpuStats:
    def __init__(self, nvml: Nvml, devices: Iterable[GpuDevice]) -> None:
        self.devices = list(devices)
        for device in self.devices:
            if not isinstance(device, GpuDevice):
                raise TypeError(f"expected GpuDevice, not {device!r}")
        self._nvml = nvml
        self._handles: dict[int, Any] = {}
        self.opened = False
        self.open_error: str | None = None

    def open(self) -> bool:
        """
        Initialise NVML (once); False when it does not initialise, with the reason in
        ``open_error``. It blocks (NVML loads the driver's library), so the collector
        calls it in its worker thread and logs ``open_error`` itself.
        """
        if self.opened:
            return True
        if not self.devices:
            return False  # nothing to ask about; leave NVML alone
        try:
            self._nvml.nvmlInit()
        except Exception as error:
            self.open_error = describe_nvml_error(error)
            return False
        self.open_error = None
        self.opened = True
        return True

    def close(self) -> None:
        if not self.opened:
            return
        self.opened = False
        self._handles.clear()
        try:
            self._nvml.nvmlShutdown()
        except Exception as error:
            log.warn("NVML did not shut down cleanly: {error}", error=describe_nvml_error(error))

    def sample(self) -> list[dict[str, Any]]:
        """One entry per device, in index order; ``[]`` when NVML is not open."""
        if not self.opened:
            return []
        return [self._sample_device(device) for device in self.devices]

    def _handle(self, device: GpuDevice) -> Any:
        handle = self._handles.get(device.index)
        if handle is None:
            handle = self._nvml.nvmlDeviceGetHandleByIndex(device.index)
            uuid = nvml_text(self._nvml.nvmlDeviceGetUUID(handle))
            if uuid != device.uuid:
                # Indexes moved (a driver reload, a device gone): never report another
                # device's numbers under this one's name.
                raise LookupError(f"index {device.index} is now {uuid}, not {device.uuid}")
            self._handles[device.index] = handle
        return handle

    def _sample_device(self, device: GpuDevice) -> dict[str, Any]:
        entry: dict[str, Any] = {
            samples.GPU_INDEX: device.index,
            samples.GPU_UUID: device.uuid,
            samples.GPU_NAME: device.name,
        }
        try:
            handle = self._handle(device)
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            mem_used, mem_total = int(memory.used), int(memory.total)
            util = self._utilisation(handle)
        except Exception as error:
            self._handles.pop(device.index, None)
            entry[samples.SAMPLE_ERROR] = describe_nvml_error(error)
            return entry
        entry[samples.GPU_UTIL_PERCENT] = util
        entry[samples.GPU_MEM_USED] = mem_used
        entry[samples.GPU_MEM_TOTAL] = mem_total
        return entry

    def _utilisation(self, handle: Any) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception as error:
            not_supported = getattr(self._nvml, "NVMLError_NotSupported", None)
            if not_supported is not None and isinstance(error, not_supported):
                return None
            raise
