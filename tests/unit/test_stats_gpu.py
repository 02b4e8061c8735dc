"""GpuStats against FakeNvml."""

import pytest

from bai_agent.node.gpus import GpuDevice, discover_gpus
from bai_agent.stats.gpu import GpuStats
from bai_agent.testing.fake_nvml import FakeGpu, FakeNvml, fake_gpus

GIB = 1 << 30


def opened(nvml):
    stats = GpuStats(nvml, discover_gpus(nvml))
    assert stats.open()
    return stats


def test_utilisation_and_memory_of_every_device():
    nvml = FakeNvml(fake_gpus(2, memory_total=80 * GIB))
    nvml.update_gpu(0, gpu_utilization=87, memory_used=30 * GIB)
    nvml.update_gpu(1, gpu_utilization=3, memory_used=1 * GIB)
    stats = opened(nvml)
    assert stats.sample() == [
        {
            "index": 0,
            "uuid": nvml.gpus[0].uuid,
            "name": "NVIDIA H100 80GB HBM3",
            "util_percent": 87.0,
            "mem_used": 30 * GIB,
            "mem_total": 80 * GIB,
        },
        {
            "index": 1,
            "uuid": nvml.gpus[1].uuid,
            "name": "NVIDIA H100 80GB HBM3",
            "util_percent": 3.0,
            "mem_used": 1 * GIB,
            "mem_total": 80 * GIB,
        },
    ]


def test_each_sample_reads_the_devices_again():
    nvml = FakeNvml(fake_gpus(1))
    stats = opened(nvml)
    assert stats.sample()[0]["util_percent"] == 0.0
    nvml.update_gpu(0, gpu_utilization=55, memory_used=GIB)
    assert (stats.sample()[0]["util_percent"], stats.sample()[0]["mem_used"]) == (55.0, GIB)


def test_nvml_is_initialised_once_and_shut_down_on_close():
    nvml = FakeNvml(fake_gpus(2))
    stats = opened(nvml)
    for _ in range(5):
        stats.sample()
    assert stats.open()  # a second open is a no-op
    assert (nvml.init_calls, nvml.initialised) == (2, True)  # discovery's own, and ours
    stats.close()
    stats.close()
    assert (nvml.shutdown_calls, nvml.initialised) == (2, False)
    assert stats.sample() == []


def test_a_lost_device_is_an_error_without_numbers_and_the_others_stay():
    nvml = FakeNvml(fake_gpus(2))
    stats = opened(nvml)
    nvml.update_gpu(0, lost=True)
    lost, fine = stats.sample()
    assert lost == {
        "index": 0,
        "uuid": nvml.gpus[0].uuid,
        "name": nvml.gpus[0].name,
        "error": "NVMLError_GpuIsLost: GPU is lost",
    }
    assert "error" not in fine and fine["mem_total"] == nvml.gpus[1].memory_total


def test_a_device_that_comes_back_is_read_again():
    nvml = FakeNvml(fake_gpus(1))
    stats = opened(nvml)
    nvml.update_gpu(0, lost=True)
    assert "error" in stats.sample()[0]
    nvml.update_gpu(0, lost=False, gpu_utilization=12)
    assert stats.sample()[0]["util_percent"] == 12.0


def test_unsupported_utilisation_keeps_the_memory_numbers():
    nvml = FakeNvml([FakeGpu(uuid="GPU-mig", memory_used=5 * GIB, utilization_supported=False)])
    stats = opened(nvml)
    [entry] = stats.sample()
    assert (entry["util_percent"], entry["mem_used"]) == (None, 5 * GIB)
    assert "error" not in entry


def test_a_device_whose_index_now_names_another_gpu_is_an_error():
    nvml = FakeNvml(fake_gpus(2))
    devices = discover_gpus(nvml)
    stats = GpuStats(nvml, devices)
    nvml.gpus.reverse()  # the driver reloaded and numbered them the other way round
    stats.open()
    entries = stats.sample()
    assert all("error" in entry and "mem_used" not in entry for entry in entries)
    assert "is now" in entries[0]["error"]


@pytest.mark.parametrize("nvml", [FakeNvml.driver_not_loaded(), FakeNvml.library_not_found()])
def test_nvml_that_does_not_initialise_means_no_gpu_statistics(nvml):
    devices = [GpuDevice(index=0, uuid="GPU-x", name="gone", memory_total=GIB)]
    stats = GpuStats(nvml, devices)
    assert stats.open() is False
    assert stats.open_error.startswith("NVMLError_")
    assert stats.sample() == []
    stats.close()
    assert nvml.shutdown_calls == 0


def test_no_devices_leaves_nvml_alone():
    nvml = FakeNvml([])
    stats = GpuStats(nvml, [])
    assert stats.open() is False
    assert stats.open_error is None
    assert stats.sample() == [] and nvml.init_calls == 0


def test_old_pynvml_bytes_uuids_match():
    nvml = FakeNvml(fake_gpus(1), names_as_bytes=True)
    stats = opened(nvml)
    assert "error" not in stats.sample()[0]


def test_devices_must_be_gpu_devices():
    with pytest.raises(TypeError):
        GpuStats(FakeNvml(), [{"index": 0}])
