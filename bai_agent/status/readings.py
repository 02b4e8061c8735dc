"""
What the status page and ``/metrics`` read of the etcd registration, the event journal and
kernel records, checked (see ``bai_agent.stats.readings`` for the statistics).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bai_agent.stats.readings import mapping, number

if TYPE_CHECKING:
    from bai_agent.etcd.service import EtcdService
    from bai_agent.kernels.journal import EventJournal


def heartbeat_delays(etcd: EtcdService | None) -> tuple[float, float]:
    """(last, largest since start) delay of the etcd heartbeat against its schedule, seconds."""
    last = number(getattr(etcd, "heartbeat_delay", 0.0)) if etcd is not None else None
    largest = number(getattr(etcd, "heartbeat_delay_max", 0.0)) if etcd is not None else None
    return (last or 0.0, largest or 0.0)


def journal_size(journal: EventJournal | None) -> tuple[int, int]:
    """(events kept, last seq) of the event journal; (0, 0) without one."""
    if journal is None:
        return (0, 0)
    return (len(journal), journal.last_seq)


def journal_file_bytes(journal: EventJournal | None) -> int:
    """Bytes in the event journal's file; 0 without one."""
    return 0 if journal is None else journal.file_bytes


def kernel_gpus(kernel_record: dict[str, Any]) -> list[int]:
    """The NVML indices granted to a kernel (its record's ``resources["cuda.device"]``)."""
    devices = mapping(kernel_record.get("resources")).get("cuda.device")
    if not isinstance(devices, (list, tuple)):
        return []
    return [device for device in devices if isinstance(device, int) and not isinstance(device, bool)]
