"""NVIDIA device discovery through NVML, with FakeNvml, and FakeNvml's fidelity to pynvml."""

import sys

import pytest
from twisted.logger import LogLevel, capturedLogs, formatEvent

from bai_agent.node.gpus import GpuDevice, discover_gpus
from bai_agent.testing import fake_nvml
from bai_agent.testing.fake_nvml import FakeGpu, FakeNvml, fake_gpus

GIB = 1 << 30


def messages(events, minimum=LogLevel.debug):
    return [formatEvent(event) for event in events if event["log_level"] >= minimum]


def test_discovers_every_device_in_index_order():
    nvml = FakeNvml(
        [
            FakeGpu(name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaa", memory_total=80 * GIB),
            FakeGpu(name="NVIDIA A10", uuid="GPU-bbbb", memory_total=24 * GIB),
        ]
    )
    assert discover_gpus(nvml) == [
        GpuDevice(index=0, uuid="GPU-aaaa", name="NVIDIA H100 80GB HBM3", memory_total=80 * GIB),
        GpuDevice(index=1, uuid="GPU-bbbb", name="NVIDIA A10", memory_total=24 * GIB),
    ]


def test_discovery_shuts_nvml_down_after_initialising_it():
    nvml = FakeNvml(fake_gpus(2))
    discover_gpus(nvml)
    assert (nvml.init_calls, nvml.shutdown_calls, nvml.initialised) == (1, 1, False)


def test_old_pynvml_bytes_names_become_text():
    nvml = FakeNvml([FakeGpu(name="Tesla V100", uuid="GPU-cccc")], names_as_bytes=True)
    [device] = discover_gpus(nvml)
    assert (device.name, device.uuid) == ("Tesla V100", "GPU-cccc")


def test_a_machine_with_nvml_but_no_devices_has_no_gpus():
    nvml = FakeNvml([])
    assert discover_gpus(nvml) == []
    assert nvml.shutdown_calls == 1


def test_driver_not_loaded_means_no_gpus_and_says_why():
    nvml = FakeNvml.driver_not_loaded()
    with capturedLogs() as events:
        assert discover_gpus(nvml) == []
    assert any("NVMLError_DriverNotLoaded: Driver Not Loaded" in message for message in messages(events))
    # nvmlShutdown after a failed nvmlInit would itself fail with Uninitialized.
    assert (nvml.init_calls, nvml.shutdown_calls) == (1, 0)


def test_missing_nvml_library_means_no_gpus():
    with capturedLogs() as events:
        assert discover_gpus(FakeNvml.library_not_found()) == []
    assert any("NVML Shared Library Not Found" in message for message in messages(events))


def test_any_exception_from_nvml_init_means_no_gpus():
    nvml = FakeNvml(fake_gpus(1), init_error=OSError("libnvidia-ml.so.1: cannot open shared object file"))
    assert discover_gpus(nvml) == []


def test_without_nvidia_ml_py_installed_there_are_no_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with capturedLogs() as events:
        assert discover_gpus() == []
    assert any("nvidia-ml-py" in message for message in messages(events))


def test_the_default_nvml_is_the_pynvml_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(fake_gpus(3)))
    assert [device.index for device in discover_gpus()] == [0, 1, 2]


def test_a_failing_device_count_means_no_gpus_and_nvml_is_shut_down():
    class CountFails(FakeNvml):
        def nvmlDeviceGetCount(self):
            raise fake_nvml.NVMLError_Unknown()

    nvml = CountFails(fake_gpus(2))
    with capturedLogs() as events:
        assert discover_gpus(nvml) == []
    assert any("Unknown Error" in message for message in messages(events, LogLevel.warn))
    assert not nvml.initialised


def test_a_lost_device_is_left_out_and_the_others_keep_their_indices():
    gpus = fake_gpus(3)
    nvml = FakeNvml(gpus)
    nvml.update_gpu(1, lost=True)
    with capturedLogs() as events:
        devices = discover_gpus(nvml)
    assert [(device.index, device.uuid) for device in devices] == [(0, gpus[0].uuid), (2, gpus[2].uuid)]
    assert any(
        "device 1 is left out" in message and "GpuIsLost" in message for message in messages(events, LogLevel.warn)
    )
    assert not nvml.initialised


def test_a_failing_shutdown_does_not_lose_the_devices():
    class ShutdownFails(FakeNvml):
        def nvmlShutdown(self):
            raise fake_nvml.NVMLError_Unknown()

    with capturedLogs() as events:
        devices = discover_gpus(ShutdownFails(fake_gpus(2)))
    assert len(devices) == 2
    assert any("did not shut down" in message for message in messages(events, LogLevel.warn))


# FakeNvml's own behaviour, where it must match pynvml's.


def test_nvml_error_code_makes_the_named_subclass_as_pynvml_does():
    error = fake_nvml.NVMLError(fake_nvml.NVML_ERROR_DRIVER_NOT_LOADED)
    assert type(error) is fake_nvml.NVMLError_DriverNotLoaded
    assert isinstance(error, FakeNvml.NVMLError)
    assert (error.value, str(error)) == (9, "Driver Not Loaded")
    assert fake_nvml.NVMLError_DriverNotLoaded().value == 9


def test_fake_nvml_refuses_queries_outside_init_and_shutdown():
    nvml = FakeNvml(fake_gpus(1))
    with pytest.raises(fake_nvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetCount()
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    nvml.nvmlShutdown()
    with pytest.raises(fake_nvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetName(handle)
    with pytest.raises(fake_nvml.NVMLError_Uninitialized):
        nvml.nvmlShutdown()


def test_fake_nvml_rejects_an_index_past_the_count():
    nvml = FakeNvml(fake_gpus(1))
    nvml.nvmlInit()
    with pytest.raises(fake_nvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetHandleByIndex(1)


def test_fake_nvml_reports_memory_and_utilisation_readings():
    gpu = FakeGpu(memory_total=16 * GIB, memory_used=4 * GIB, gpu_utilization=75, memory_utilization=20)
    nvml = FakeNvml([gpu])
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    assert (memory.total, memory.used, memory.free) == (16 * GIB, 4 * GIB, 12 * GIB)
    utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
    assert (utilization.gpu, utilization.memory) == (75, 20)
    nvml.update_gpu(0, gpu_utilization=5)
    assert nvml.nvmlDeviceGetUtilizationRates(handle).gpu == 5


# The contract both the fake and, where there is one, the real NVML keep.


def _real_nvml_or_skip():
    try:
        import pynvml
    except ImportError:
        pytest.skip("nvidia-ml-py is not installed: the real NVML is checked on a GPU machine")
    try:
        pynvml.nvmlInit()
    except Exception as error:
        pytest.skip(f"no usable NVIDIA driver here ({type(error).__name__}): checked on a GPU machine")
    pynvml.nvmlShutdown()
    return pynvml


@pytest.fixture(params=["fake", "real"])
def nvml(request):
    if request.param == "fake":
        return FakeNvml(fake_gpus(2))
    return _real_nvml_or_skip()


def test_nvml_answers_with_the_types_discovery_relies_on(nvml):
    nvml.nvmlInit()
    try:
        count = nvml.nvmlDeviceGetCount()
        assert isinstance(count, int) and count >= 1
        handle = nvml.nvmlDeviceGetHandleByIndex(0)
        assert isinstance(nvml.nvmlDeviceGetName(handle), (str, bytes))
        assert isinstance(nvml.nvmlDeviceGetUUID(handle), (str, bytes))
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        assert all(isinstance(getattr(memory, field), int) for field in ("total", "used", "free"))
        assert 0 < memory.total and memory.used <= memory.total and memory.free <= memory.total
        utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
        assert 0 <= utilization.gpu <= 100 and 0 <= utilization.memory <= 100
        with pytest.raises(nvml.NVMLError):
            nvml.nvmlDeviceGetHandleByIndex(count)
    finally:
        nvml.nvmlShutdown()


def test_discovery_finds_every_device_nvml_counts(nvml):
    nvml.nvmlInit()
    try:
        count = nvml.nvmlDeviceGetCount()
    finally:
        nvml.nvmlShutdown()
    devices = discover_gpus(nvml)
    assert [device.index for device in devices] == list(range(count))
    for device in devices:
        assert device.uuid.startswith("GPU-") and device.name and device.memory_total > 0
