"""
A stand-in for nvidia-ml-py's ``pynvml`` module, for machines without NVIDIA devices.

``FakeNvml`` has the functions the agent calls, with the real module's signatures and
return types (checked against nvidia-ml-py 13.x):

- ``nvmlDeviceGetCount()`` -> ``int``
- ``nvmlDeviceGetHandleByIndex(i)`` -> an opaque handle (the real one is a ctypes pointer);
  an index past the count raises ``NVMLError_InvalidArgument``
- ``nvmlDeviceGetName(h)``, ``nvmlDeviceGetUUID(h)`` -> ``str`` (``bytes`` with
  ``names_as_bytes=True``, as nvidia-ml-py before 11.515 and the old ``pynvml`` answered)
- ``nvmlDeviceGetMemoryInfo(h)`` -> a ctypes structure with ``total``, ``free``, ``used``
  (``version=`` gives the v2 structure, which adds ``reserved``)
- ``nvmlDeviceGetUtilizationRates(h)`` -> a ctypes structure with ``gpu``, ``memory`` (percent);
  ``NVMLError_NotSupported`` for a device made with ``utilization_supported=False``

Like the real library it counts ``nvmlInit``/``nvmlShutdown`` calls, answers
``NVMLError_Uninitialized`` outside them, and its errors are ``NVMLError`` subclasses with
the real names and codes, so ``except fake.NVMLError_DriverNotLoaded`` reads as with pynvml.
"""

from __future__ import annotations

import ctypes

import attrs

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

_ERROR_TEXT = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """``NVMLError(code)`` makes the subclass for that code, as pynvml's does."""

    _class_by_code: dict = {}
    value: int  # the NVML return code (each code's subclass sets it)

    def __new__(cls, value=None):
        if cls is NVMLError:
            cls = NVMLError._class_by_code.get(value, cls)
        error = Exception.__new__(cls)
        error.value = value if value is not None else cls.value
        return error

    def __init__(self, value=None):
        super().__init__()

    def __str__(self):
        return _ERROR_TEXT.get(self.value, f"NVML Error with code {self.value}")

    def __reduce__(self):
        return (NVMLError, (self.value,))


def _error_class(name: str, code: int):
    error_class = type(name, (NVMLError,), {"value": code})
    NVMLError._class_by_code[code] = error_class
    return error_class


NVMLError_Uninitialized = _error_class("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_InvalidArgument = _error_class("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_GpuIsLost = _error_class("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)
NVMLError_Unknown = _error_class("NVMLError_Unknown", NVML_ERROR_UNKNOWN)


class c_nvmlMemory_t(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class c_nvmlMemory_v2_t(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint),
        ("total", ctypes.c_ulonglong),
        ("reserved", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    ]


class c_nvmlUtilization_t(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


@attrs.frozen
class FakeGpu:
    """One fake device; ``lost=True`` makes every query about it fail with ``GpuIsLost``."""

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    memory_total: int = 80 * (1 << 30)
    memory_used: int = 0
    gpu_utilization: int = 0
    memory_utilization: int = 0
    lost: bool = False
    #: False: ``nvmlDeviceGetUtilizationRates`` raises ``NVMLError_NotSupported``, as it
    #: does for MIG instances and some older boards
    utilization_supported: bool = True


def fake_gpus(count: int, name: str = "NVIDIA H100 80GB HBM3", memory_total: int = 80 * (1 << 30)):
    """``count`` identical devices with distinct UUIDs."""
    return [
        FakeGpu(name=name, uuid=f"GPU-{index:08x}-0000-4000-8000-{index:012x}", memory_total=memory_total)
        for index in range(count)
    ]


@attrs.frozen
class FakeDeviceHandle:
    index: int


class FakeNvml:
    """A ``pynvml``-like object over ``gpus``; ``init_error`` is raised by every ``nvmlInit``."""

    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_InvalidArgument = NVMLError_InvalidArgument
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_Unknown = NVMLError_Unknown

    def __init__(self, gpus=(), init_error: Exception | None = None, names_as_bytes: bool = False):
        self.gpus = list(gpus)
        self.init_error = init_error
        self.names_as_bytes = names_as_bytes
        self.init_calls = 0
        self.shutdown_calls = 0
        self._references = 0

    @classmethod
    def driver_not_loaded(cls) -> FakeNvml:
        """A machine with the library but no loaded kernel driver (a CPU-only host, a bare container)."""
        return cls(init_error=NVMLError_DriverNotLoaded())

    @classmethod
    def library_not_found(cls) -> FakeNvml:
        """A machine without ``libnvidia-ml.so.1``."""
        return cls(init_error=NVMLError_LibraryNotFound())

    @property
    def initialised(self) -> bool:
        return self._references > 0

    def update_gpu(self, index: int, **changes) -> None:
        """Change a device's readings (utilisation, memory used, lost) between calls."""
        self.gpus[index] = attrs.evolve(self.gpus[index], **changes)

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error
        self._references += 1

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        if self._references == 0:
            raise NVMLError_Uninitialized()
        self._references -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._require_init()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index) -> FakeDeviceHandle:
        self._require_init()
        if not isinstance(index, int) or not 0 <= index < len(self.gpus):
            raise NVMLError_InvalidArgument()
        return FakeDeviceHandle(index)

    def nvmlDeviceGetName(self, handle):
        return self._text(self._gpu(handle).name)

    def nvmlDeviceGetUUID(self, handle):
        return self._text(self._gpu(handle).uuid)

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        gpu = self._gpu(handle)
        free = gpu.memory_total - gpu.memory_used
        if not version:
            return c_nvmlMemory_t(total=gpu.memory_total, free=free, used=gpu.memory_used)
        return c_nvmlMemory_v2_t(version=version, total=gpu.memory_total, reserved=0, free=free, used=gpu.memory_used)

    def nvmlDeviceGetUtilizationRates(self, handle) -> c_nvmlUtilization_t:
        gpu = self._gpu(handle)
        if not gpu.utilization_supported:
            raise NVMLError_NotSupported()
        return c_nvmlUtilization_t(gpu=gpu.gpu_utilization, memory=gpu.memory_utilization)

    def _require_init(self) -> None:
        if self._references == 0:
            raise NVMLError_Uninitialized()

    def _gpu(self, handle) -> FakeGpu:
        self._require_init()
        if not isinstance(handle, FakeDeviceHandle) or not 0 <= handle.index < len(self.gpus):
            raise NVMLError_InvalidArgument()
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise NVMLError_GpuIsLost()
        return gpu

    def _text(self, value: str):
        return value.encode() if self.names_as_bytes else value
