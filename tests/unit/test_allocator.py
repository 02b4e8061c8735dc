"""Resource requests and the allocator: validation, fitting, pinning, quotas, GPUs, release, restore."""

import json
import math
import os

import pytest
from hypothesis import assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule
from twisted.logger import LogLevel, capturedLogs

from bai_agent.kernels.allocator import (
    CPU_PERIOD_US,
    DEFAULT_MEM,
    MIN_MEM,
    Allocator,
    Grant,
    ResourceRequest,
    parse_resource_request,
)
from bai_agent.node.capacity import Capacity
from bai_agent.node.gpus import GpuDevice
from bai_agent.protocol.errors import InsufficientResources, InvalidRequest

MIB = 1 << 20
GIB = 1 << 30
MACHINE = Capacity(cpu=4.0, mem=8 * GIB, cuda_device=2)


def gpus(*indices):
    return [
        GpuDevice(index=index, uuid=f"GPU-{index:04d}", name="NVIDIA H100", memory_total=80 * GIB) for index in indices
    ]


def allocator(cpu=4.0, mem=8 * GIB, gpu_indices=(0, 1), cores=None):
    cores = list(range(math.ceil(cpu))) if cores is None else cores
    capacity = Capacity(cpu=cpu, mem=mem, cuda_device=len(gpu_indices))
    return Allocator(capacity, gpus(*gpu_indices), cpu_cores=cores)


def request(cpu=1, mem=GIB, cuda_devices=0):
    return ResourceRequest(cpu=float(cpu), mem=mem, cuda_devices=cuda_devices)


# parse_resource_request


def test_absent_keys_take_the_documented_defaults():
    assert parse_resource_request({}, MACHINE) == ResourceRequest(cpu=1.0, mem=512 * MIB, cuda_devices=0)
    assert DEFAULT_MEM == 512 * MIB


def test_defaults_shrink_to_a_machine_smaller_than_them():
    small = Capacity(cpu=0.5, mem=256 * MIB, cuda_device=0)
    assert parse_resource_request({}, small) == ResourceRequest(cpu=0.5, mem=256 * MIB, cuda_devices=0)


@pytest.mark.parametrize(
    "resources, expected",
    [
        ({"cpu": 2, "mem": 1073741824}, ResourceRequest(2.0, GIB, 0)),
        ({"cpu": 0.5, "mem": "512m"}, ResourceRequest(0.5, 512 * MIB, 0)),
        ({"cpu": 1.5, "mem": "1.5g", "cuda.device": 2}, ResourceRequest(1.5, 3 * GIB // 2, 2)),
        ({"mem": "2G"}, ResourceRequest(1.0, 2 * GIB, 0)),
        ({"mem": 1073741824.0}, ResourceRequest(1.0, GIB, 0)),
        ({"cpu": 0.3333333}, ResourceRequest(0.333, 512 * MIB, 0)),
        ({"cpu": 0.0996}, ResourceRequest(0.1, 512 * MIB, 0)),
        ({"cpu": 0.01}, ResourceRequest(0.01, 512 * MIB, 0)),
        ({"cuda.device": 0}, ResourceRequest(1.0, 512 * MIB, 0)),
    ],
)
def test_valid_requests_parse(resources, expected):
    assert parse_resource_request(resources, MACHINE) == expected


@pytest.mark.parametrize(
    "resources, named",
    [
        ({"cpu": -1}, "resources.cpu"),
        ({"cpu": 0}, "resources.cpu"),
        ({"cpu": 0.0}, "resources.cpu"),
        ({"cpu": 0.004}, "at least 0.01"),
        ({"cpu": float("nan")}, "finite"),
        ({"cpu": float("inf")}, "finite"),
        ({"cpu": float("-inf")}, "finite"),
        ({"cpu": "2"}, "resources.cpu"),
        ({"cpu": True}, "boolean"),
        ({"cpu": None}, "null"),
        ({"cpu": [1]}, "list"),
        ({"mem": "12q"}, "resources.mem"),
        ({"mem": -1}, "resources.mem"),
        ({"mem": 0}, "at least 6 MiB"),
        ({"mem": MIN_MEM - 1}, "at least 6 MiB"),
        ({"mem": "1k"}, "at least 6 MiB"),
        ({"mem": 1.5}, "resources.mem"),
        ({"mem": float("nan")}, "resources.mem"),
        ({"mem": float("inf")}, "resources.mem"),
        ({"mem": "9" * 400 + "g"}, "resources.mem"),
        ({"mem": False}, "resources.mem"),
        ({"mem": None}, "resources.mem"),
        ({"mem": {"bytes": 1}}, "resources.mem"),
        ({"cuda.device": -1}, "resources.cuda.device"),
        ({"cuda.device": 1.0}, "resources.cuda.device"),
        ({"cuda.device": True}, "resources.cuda.device"),
        ({"cuda.device": "1"}, "resources.cuda.device"),
        ({"gpu": 1}, "'gpu'"),
        ({"cpu": 1, "memory": "1g", "cuda.devices": 1}, "'cuda.devices', 'memory'"),
    ],
)
def test_bad_requests_are_invalid_and_name_the_key(resources, named):
    with pytest.raises(InvalidRequest) as raised:
        parse_resource_request(resources, MACHINE)
    assert named in str(raised.value)


@pytest.mark.parametrize("resources", [None, [], "cpu=1", 4, ["cpu", 1]])
def test_resources_that_are_not_an_object_are_invalid(resources):
    with pytest.raises(InvalidRequest, match="must be an object"):
        parse_resource_request(resources, MACHINE)


@pytest.mark.parametrize(
    "resources, slot",
    [
        ({"cpu": 5}, "cpu 5 asked, 4 in the whole machine"),
        ({"cpu": 4.001}, "cpu 4.001 asked, 4"),
        ({"cpu": 10**400}, "cpu more than 10^15 asked"),
        ({"cpu": 1e308}, "cpu more than 10^15 asked"),
        ({"mem": "9g"}, "mem 9 GiB asked, 8 GiB"),
        ({"mem": 10**30}, "mem more than 1 EiB asked"),
        ({"mem": "99999t"}, "mem 99999 TiB asked, 8 GiB in the whole machine"),
        ({"cuda.device": 3}, "cuda.device 3 asked, 2"),
        ({"cuda.device": 10**100}, "cuda.device"),
    ],
)
def test_requests_larger_than_the_machine_can_never_fit(resources, slot):
    with pytest.raises(InsufficientResources) as raised:
        parse_resource_request(resources, MACHINE)
    assert "can never fit" in str(raised.value)
    assert slot in str(raised.value)


def test_a_request_too_large_in_every_slot_names_every_slot():
    with pytest.raises(InsufficientResources) as raised:
        parse_resource_request({"cpu": 8, "mem": "16g", "cuda.device": 4}, MACHINE)
    message = str(raised.value)
    assert all(slot in message for slot in ("cpu 8 asked", "mem 16 GiB asked", "cuda.device 4 asked"))


def test_a_fractional_capacity_is_never_rounded_up():
    reserved = Capacity(cpu=8 - 1.0004, mem=8 * GIB, cuda_device=0)
    assert parse_resource_request({"cpu": 6.999}, reserved).cpu == 6.999
    with pytest.raises(InsufficientResources, match="never fit"):
        parse_resource_request({"cpu": 7}, reserved)


def test_requests_come_from_json_the_way_managers_send_them():
    resources = json.loads('{"cpu": 2, "mem": "2g", "cuda.device": 1}')
    assert parse_resource_request(resources, MACHINE) == ResourceRequest(2.0, 2 * GIB, 1)
    with pytest.raises(InvalidRequest):
        parse_resource_request(json.loads('{"cpu": 1e400}'), MACHINE)  # json gives inf


# Allocator: CPU


def test_whole_cores_are_pinned_to_the_lowest_free_cores_without_quota():
    alloc = allocator()
    grant = alloc.allocate("k1", request(cpu=2))
    assert (grant.cpuset, grant.cpu_quota_us, grant.cpu_period_us) == ((0, 1), None, CPU_PERIOD_US)
    assert alloc.allocate("k2", request(cpu=1)).cpuset == (2,)


def test_whole_core_grants_get_cores_of_their_own_while_unpinned_cores_remain():
    alloc = allocator(cpu=8.0)
    first = alloc.allocate("a", request(cpu=2))
    second = alloc.allocate("b", request(cpu=1))
    alloc.release("a")
    third = alloc.allocate("c", request(cpu=3))
    assert (first.cpuset, second.cpuset, third.cpuset) == ((0, 1), (2,), (0, 1, 3))
    assert alloc.core_load() == {0: 1, 1: 1, 2: 1, 3: 1, 4: 0, 5: 0, 6: 0, 7: 0}


def test_when_no_unpinned_core_remains_grants_share_the_least_loaded_cores():
    # Three cores for a capacity of six: more whole cores can be granted than pinned alone.
    alloc = allocator(cpu=6.0, cores=[0, 1, 2])
    assert alloc.allocate("a", request(cpu=2)).cpuset == (0, 1)
    assert alloc.allocate("b", request(cpu=1)).cpuset == (2,)
    assert alloc.allocate("c", request(cpu=1)).cpuset == (0,)  # all loaded once: lowest index
    assert alloc.allocate("d", request(cpu=2)).cpuset == (1, 2)  # core 0 carries two grants now
    assert alloc.core_load() == {0: 2, 1: 2, 2: 2}


def test_a_whole_core_request_wider_than_the_pinnable_cores_gets_a_quota():
    alloc = allocator(cpu=4.0, cores=[0, 1])
    grant = alloc.allocate("wide", request(cpu=3))
    assert (grant.cpuset, grant.cpu_quota_us) == ((), 3 * CPU_PERIOD_US)


@pytest.mark.parametrize("cpu, quota", [(0.5, 50_000), (0.01, 1_000), (2.5, 250_000), (1.001, 100_100)])
def test_fractions_of_cores_get_a_quota_and_no_pinning(cpu, quota):
    alloc = allocator()
    grant = alloc.allocate("k", request(cpu=cpu))
    assert (grant.cpuset, grant.cpu_quota_us, grant.cpu_period_us) == ((), quota, CPU_PERIOD_US)
    assert set(alloc.core_load().values()) == {0}


def test_a_reservation_leaves_the_lowest_cores_unpinned():
    alloc = allocator(cpu=8 - 1.5, cores=list(range(8)))
    assert alloc.pinnable_cores == (2, 3, 4, 5, 6, 7)
    assert alloc.allocate("k", request(cpu=2)).cpuset == (2, 3)
    assert alloc.free()["cpu"] == 4.5


def test_a_machine_with_less_than_a_core_pins_nothing():
    alloc = allocator(cpu=0.5, cores=[0, 1])
    assert alloc.pinnable_cores == ()
    with pytest.raises(InsufficientResources, match="never fit"):
        alloc.allocate("k", request(cpu=1))
    assert alloc.allocate("k", request(cpu=0.5)).cpu_quota_us == 50_000


def test_the_cores_default_to_every_core_of_the_machine():
    cores = os.cpu_count()
    alloc = Allocator(Capacity(cpu=float(cores), mem=GIB, cuda_device=0), [])
    assert alloc.pinnable_cores == tuple(range(cores))


def test_cpu_is_accounted_exactly_in_millicores():
    alloc = allocator(cpu=1.0, cores=[0])
    for index in range(10):
        alloc.allocate(f"k{index}", request(cpu=0.1, mem=MIB * 8))
    assert alloc.used()["cpu"] == 1.0 and alloc.free()["cpu"] == 0.0
    with pytest.raises(InsufficientResources, match="does not fit now"):
        alloc.allocate("one-too-many", request(cpu=0.01, mem=MIB * 8))


# Allocator: fitting


def test_one_millicore_over_the_free_share_does_not_fit():
    alloc = allocator(cpu=1.0, cores=[0])
    alloc.allocate("a", request(cpu=0.5, mem=8 * MIB))
    with pytest.raises(InsufficientResources, match="cpu 0.501 asked, 0.5 free"):
        alloc.allocate("b", request(cpu=0.501, mem=8 * MIB))
    assert alloc.allocate("b", request(cpu=0.5, mem=8 * MIB)).cpu == 0.5


def test_a_request_that_fits_the_machine_but_not_the_free_share_says_what_is_free():
    alloc = allocator()
    alloc.allocate("big", request(cpu=3, mem=6 * GIB, cuda_devices=2))
    with pytest.raises(InsufficientResources) as raised:
        alloc.allocate("late", request(cpu=2, mem=GIB, cuda_devices=1))
    message = str(raised.value)
    assert "does not fit now" in message and "never" not in message
    assert "cpu 2 asked, 1 free" in message and "cuda.device 1 asked, 0 free" in message
    assert "free: cpu 1, mem 2 GiB, cuda.device 0" in message
    assert "late" not in alloc.grants()


def test_memory_alone_can_be_what_does_not_fit():
    alloc = allocator()
    alloc.allocate("a", request(cpu=1, mem=7 * GIB))
    with pytest.raises(InsufficientResources, match=r"mem 2 GiB asked, 1 GiB free"):
        alloc.allocate("b", request(cpu=1, mem=2 * GIB))


def test_the_allocator_refuses_a_request_larger_than_the_machine_as_never_fitting():
    with pytest.raises(InsufficientResources, match="never fit"):
        allocator().allocate("k", request(cpu=5))


def test_an_exact_fit_is_granted():
    alloc = allocator()
    grant = alloc.allocate("all", request(cpu=4, mem=8 * GIB, cuda_devices=2))
    assert grant.cpuset == (0, 1, 2, 3) and grant.cuda_devices == (0, 1)
    assert alloc.free() == {"cpu": 0.0, "mem": 0, "cuda.device": 0}


def test_a_second_grant_for_one_kernel_is_a_programming_error_and_changes_nothing():
    alloc = allocator()
    alloc.allocate("k", request(cpu=1))
    used = alloc.used()
    with pytest.raises(ValueError):
        alloc.allocate("k", request(cpu=1))
    assert alloc.used() == used


# Allocator: GPUs


def test_gpus_are_granted_by_index_lowest_free_first_and_come_back_on_release():
    alloc = allocator(gpu_indices=(0, 1, 2))
    assert alloc.allocate("a", request(cuda_devices=1)).cuda_devices == (0,)
    assert alloc.allocate("b", request(cuda_devices=2)).cuda_devices == (1, 2)
    assert alloc.release("a")
    assert alloc.allocate("c", request(cuda_devices=1)).cuda_devices == (0,)
    assert alloc.used()["cuda.device"] == 3
    assert alloc.release("b")
    assert alloc.free()["cuda.device"] == 2
    assert alloc.allocate("d", request(cuda_devices=2)).cuda_devices == (1, 2)


def test_gpu_indices_need_not_be_contiguous():
    alloc = allocator(gpu_indices=(0, 2))  # device 1 was lost at discovery
    assert alloc.allocate("a", request(cuda_devices=2)).cuda_devices == (0, 2)


def test_the_discovered_devices_win_over_a_capacity_that_counts_otherwise():
    with capturedLogs() as events:
        alloc = Allocator(Capacity(cpu=2.0, mem=GIB, cuda_device=4), gpus(0, 1), cpu_cores=[0, 1])
    assert alloc.capacity.cuda_device == 2
    assert any(event["log_level"] == LogLevel.warn for event in events)


def test_a_kernel_without_gpus_gets_none():
    assert allocator().allocate("k", request()).cuda_devices == ()


# Allocator: release


def test_release_gives_back_exactly_once():
    alloc = allocator()
    before = alloc.free()
    alloc.allocate("k", request(cpu=2, mem=3 * GIB, cuda_devices=1))
    during = alloc.free()
    assert during == {"cpu": 2.0, "mem": 5 * GIB, "cuda.device": 1}
    assert alloc.release("k") is True
    assert alloc.free() == before and alloc.used() == {"cpu": 0.0, "mem": 0, "cuda.device": 0}
    assert set(alloc.core_load().values()) == {0}
    assert alloc.release("k") is False
    assert alloc.free() == before


def test_release_of_an_unknown_kernel_changes_nothing():
    alloc = allocator()
    alloc.allocate("k", request(cpu=0.5))
    used = alloc.used()
    assert alloc.release("nobody") is False
    assert alloc.used() == used


def test_grants_is_a_copy():
    alloc = allocator()
    grant = alloc.allocate("k", request())
    grants = alloc.grants()
    grants.clear()
    assert alloc.grants() == {"k": grant} and alloc.grant_of("k") == grant


# Grants as JSON, and restore


def test_grant_json_is_the_kernel_record_resources():
    alloc = allocator()
    pinned = alloc.allocate("a", request(cpu=2, mem=GIB, cuda_devices=1))
    shared = alloc.allocate("b", request(cpu=0.25, mem=512 * MIB))
    assert pinned.to_json() == {"cpu": 2.0, "mem": GIB, "cpuset": "0,1", "cuda.device": [0], "scratch": 0}
    assert shared.to_json() == {"cpu": 0.25, "mem": 512 * MIB, "cpuset": "", "cuda.device": [], "scratch": 0}


def test_a_grant_survives_a_json_round_trip():
    alloc = allocator(cpu=4.0, cores=[0, 1])
    for grant in (
        alloc.allocate("pinned", request(cpu=1, cuda_devices=1)),
        alloc.allocate("fraction", request(cpu=0.75)),
        alloc.allocate("wide", request(cpu=2)),  # not pinnable alone: quota
    ):
        assert Grant.from_json(grant.kernel_id, json.loads(json.dumps(grant.to_json()))) == grant


@pytest.mark.parametrize(
    "resources",
    [{}, {"cpu": 1}, {"cpu": "x", "mem": 1}, {"cpu": 1, "mem": 1, "cpuset": "0,a"}, {"cpu": 0, "mem": 1}],
)
def test_malformed_grant_json_is_a_value_error(resources):
    with pytest.raises(ValueError):
        Grant.from_json("k", resources)


def test_restore_rebuilds_the_grants_of_a_previous_run():
    before = allocator(gpu_indices=(0, 1))
    grants = [
        before.allocate("a", request(cpu=2, mem=GIB, cuda_devices=1)),
        before.allocate("b", request(cpu=0.5, mem=GIB)),
    ]
    after = allocator(gpu_indices=(0, 1))
    assert [after.restore(Grant.from_json(g.kernel_id, g.to_json())) for g in grants] == grants
    assert after.used() == before.used() and after.core_load() == before.core_load()
    more = request(cpu=1, cuda_devices=1)
    assert after.allocate("c", more) == before.allocate("c", more)


@pytest.mark.parametrize(
    "grant, why",
    [
        (Grant("k", cpu=5.0, mem=GIB, cpuset=(0, 1, 2, 3, 4)), "never fit"),
        (Grant("k", cpu=1.0, mem=GIB, cpuset=(9,)), "cores"),
        (Grant("k", cpu=2.0, mem=GIB, cpuset=(1, 1)), "cores"),
        (Grant("k", cpu=1.0, mem=GIB, cpuset=(0,), cuda_devices=(5,)), "not on this machine"),
        (Grant("k", cpu=1.0, mem=GIB, cpuset=(0,), cuda_devices=(1, 1)), "twice"),
    ],
)
def test_restore_refuses_a_grant_that_no_longer_fits_and_changes_nothing(grant, why):
    alloc = allocator()
    with pytest.raises(InsufficientResources, match=why):
        alloc.restore(grant)
    assert alloc.grants() == {} and alloc.used() == {"cpu": 0.0, "mem": 0, "cuda.device": 0}
    assert set(alloc.core_load().values()) == {0}


def test_restore_refuses_a_device_or_share_already_taken():
    alloc = allocator()
    alloc.allocate("a", request(cpu=3, mem=GIB, cuda_devices=1))
    with pytest.raises(InsufficientResources, match="taken"):
        alloc.restore(Grant("b", cpu=0.5, mem=GIB, cpu_quota_us=50_000, cuda_devices=(0,)))
    with pytest.raises(InsufficientResources, match="does not fit now"):
        alloc.restore(Grant("b", cpu=2.0, mem=GIB, cpuset=(2, 3)))
    with pytest.raises(ValueError):
        alloc.restore(Grant("a", cpu=0.5, mem=GIB, cpu_quota_us=50_000))


def test_a_restored_pin_onto_a_taken_core_is_shared_not_refused():
    # The container is running with that cpuset already; refusing would not unpin it.
    alloc = allocator()
    alloc.allocate("a", request(cpu=1))
    alloc.restore(Grant("old", cpu=1.0, mem=GIB, cpuset=(0,)))
    assert alloc.core_load()[0] == 2
    assert alloc.allocate("b", request(cpu=1)).cpuset == (1,)


# Any sequence of operations


KERNEL_IDS = [f"k{index}" for index in range(6)]


class AllocatorMachine(RuleBasedStateMachine):
    """
    Allocate, release and restore in any order, against a model of what is granted: the
    grants never exceed the capacity, every release restores exactly what it took, and
    without restores no core is pinned to two whole-core grants.
    """

    released = Bundle("released")

    @initialize(
        core_count=st.integers(1, 6),
        reserved_millicores=st.integers(0, 1500),
        mem_mib=st.integers(16, 4096),
        gpu_count=st.integers(0, 3),
        short_core_list=st.booleans(),
    )
    def build(self, core_count, reserved_millicores, mem_mib, gpu_count, short_core_list):
        assume(reserved_millicores < core_count * 1000)
        self.capacity_millicores = core_count * 1000 - reserved_millicores
        self.capacity = Capacity(cpu=self.capacity_millicores / 1000, mem=mem_mib * MIB, cuda_device=gpu_count)
        cores = list(range(core_count))
        self.short_core_list = short_core_list and core_count > 1
        if self.short_core_list:
            cores = cores[: core_count // 2]
        self.alloc = Allocator(self.capacity, gpus(*range(gpu_count)), cpu_cores=cores)
        self.model = {}
        self.restored_any = False

    def model_used(self):
        return (
            sum(grant.millicores for grant in self.model.values()),
            sum(grant.mem for grant in self.model.values()),
            sum(len(grant.cuda_devices) for grant in self.model.values()),
        )

    def fits(self, millicores, mem, cuda_devices):
        used_millicores, used_mem, used_gpus = self.model_used()
        return (
            used_millicores + millicores <= self.capacity_millicores
            and used_mem + mem <= self.capacity.mem
            and used_gpus + cuda_devices <= self.capacity.cuda_device
        )

    @rule(
        kernel_id=st.sampled_from(KERNEL_IDS),
        millicores=st.one_of(st.integers(1, 7).map(lambda cores: cores * 1000), st.integers(10, 7000)),
        mem_mib=st.integers(6, 2048),
        cuda_devices=st.integers(0, 3),
    )
    def allocate(self, kernel_id, millicores, mem_mib, cuda_devices):
        wanted = ResourceRequest(cpu=millicores / 1000, mem=mem_mib * MIB, cuda_devices=cuda_devices)
        load_before = self.alloc.core_load()
        if kernel_id in self.model:
            with pytest.raises(ValueError):
                self.alloc.allocate(kernel_id, wanted)
            return
        if not self.fits(millicores, wanted.mem, cuda_devices):
            with pytest.raises(InsufficientResources):
                self.alloc.allocate(kernel_id, wanted)
            return
        grant = self.alloc.allocate(kernel_id, wanted)
        assert (grant.millicores, grant.mem) == (millicores, wanted.mem)
        assert len(grant.cuda_devices) == cuda_devices
        pinnable = self.alloc.pinnable_cores
        if millicores % 1000 == 0 and millicores // 1000 <= len(pinnable):
            least_loaded = sorted(pinnable, key=lambda core: (load_before[core], core))[: millicores // 1000]
            assert grant.cpuset == tuple(sorted(least_loaded)) and grant.cpu_quota_us is None
        else:
            assert grant.cpuset == () and grant.cpu_quota_us == round(millicores * CPU_PERIOD_US / 1000)
        self.model[kernel_id] = grant

    @rule(target=released, kernel_id=st.sampled_from(KERNEL_IDS))
    def release(self, kernel_id):
        free_before = self.alloc.free()
        grant = self.model.pop(kernel_id, None)
        assert self.alloc.release(kernel_id) is (grant is not None)
        free_after = self.alloc.free()
        if grant is None:
            assert free_after == free_before
            return None
        assert round((free_after["cpu"] - free_before["cpu"]) * 1000) == grant.millicores
        assert free_after["mem"] - free_before["mem"] == grant.mem
        assert free_after["cuda.device"] - free_before["cuda.device"] == len(grant.cuda_devices)
        assert self.alloc.release(kernel_id) is False
        assert self.alloc.free() == free_after
        return grant

    @rule(grant=released)
    def restore(self, grant):
        if grant is None:
            return
        taken_gpus = {index for held in self.model.values() for index in held.cuda_devices}
        if grant.kernel_id in self.model:
            with pytest.raises(ValueError):
                self.alloc.restore(grant)
        elif self.fits(grant.millicores, grant.mem, len(grant.cuda_devices)) and not (
            taken_gpus & set(grant.cuda_devices)
        ):
            assert self.alloc.restore(grant) == grant
            self.model[grant.kernel_id] = grant
            self.restored_any = True
        else:
            with pytest.raises(InsufficientResources):
                self.alloc.restore(grant)

    @invariant()
    def used_is_the_sum_of_the_grants_and_within_capacity(self):
        used_millicores, used_mem, used_gpus = self.model_used()
        used, free = self.alloc.used(), self.alloc.free()
        assert round(used["cpu"] * 1000) == used_millicores
        assert (used["mem"], used["cuda.device"]) == (used_mem, used_gpus)
        assert used_millicores <= self.capacity_millicores
        assert used_mem <= self.capacity.mem and used_gpus <= self.capacity.cuda_device
        assert round((used["cpu"] + free["cpu"]) * 1000) == self.capacity_millicores
        assert used["mem"] + free["mem"] == self.capacity.mem
        assert used["cuda.device"] + free["cuda.device"] == self.capacity.cuda_device
        assert self.alloc.grants() == self.model

    @invariant()
    def devices_are_granted_once(self):
        granted = [index for grant in self.model.values() for index in grant.cuda_devices]
        assert len(granted) == len(set(granted))

    @invariant()
    def core_load_counts_the_pinned_grants(self):
        expected = {core: 0 for core in self.alloc.core_load()}
        for grant in self.model.values():
            for core in grant.cpuset:
                expected[core] += 1
        assert self.alloc.core_load() == expected
        if not self.restored_any and not self.short_core_list:
            assert all(load <= 1 for load in expected.values()), "a core pinned to two whole-core grants"


AllocatorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_any_sequence_of_allocations_and_releases = AllocatorMachine.TestCase


# Scratch: the most a kernel's home may hold


def test_scratch_is_parsed_defaulted_and_accounted_against_the_scratch_root():
    capacity = Capacity(cpu=4.0, mem=8 * GIB, cuda_device=0, scratch=20 * GIB)
    assert parse_resource_request({"scratch": "2g"}, capacity, default_scratch=10 * GIB).scratch == 2 * GIB
    assert parse_resource_request({}, capacity, default_scratch=10 * GIB).scratch == 10 * GIB
    small = Capacity(cpu=4.0, mem=8 * GIB, cuda_device=0, scratch=5 * GIB)
    assert parse_resource_request({}, small, default_scratch=10 * GIB).scratch == 5 * GIB
    for bad in ("1m", -1, True, "lots", [1]):
        with pytest.raises(InvalidRequest, match="scratch"):
            parse_resource_request({"scratch": bad}, capacity)
    with pytest.raises(InsufficientResources, match="scratch"):
        parse_resource_request({"scratch": "30g"}, capacity)
    alloc = Allocator(capacity, [], cpu_cores=[0, 1, 2, 3])
    first = alloc.allocate("a", parse_resource_request({"cpu": 0.5, "scratch": "15g"}, capacity))
    assert first.scratch == 15 * GIB and first.to_json()["scratch"] == 15 * GIB
    assert alloc.used()["scratch"] == 15 * GIB and alloc.free()["scratch"] == 5 * GIB
    with pytest.raises(InsufficientResources, match="scratch"):
        alloc.allocate("b", parse_resource_request({"cpu": 0.5, "scratch": "6g"}, capacity))
    alloc.release("a")
    assert alloc.used()["scratch"] == 0
    restored = alloc.restore(Grant.from_json("a", first.to_json()))
    assert restored.scratch == 15 * GIB
    # A grant saved by an agent without scratch limits loads as unlimited.
    old = Grant.from_json("old", {"cpu": 0.5, "mem": GIB, "cpuset": "", "cuda.device": []})
    assert old.scratch == 0
