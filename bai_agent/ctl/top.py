"""
``bai-agent-ctl top AGENT``: a live view of an agent's kernels, busiest first, like
``docker stats`` or ``kubectl top``: each kernel's CPU (percent of one core, and cores used
of granted), memory (used of granted), processes, status, age and image, redrawn every
``--interval`` seconds (2) until Ctrl-C; ``--once`` prints one table and exits.

One view is ``ListKernels`` and a ``GetKernelStats`` per kernel, all at once; a kernel that
ends between the two is left out. ``render_top`` makes the text of one view from plain
values, so that it is tested without an agent.
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Generator, Sequence
from typing import IO, Any

import attrs
from twisted.internet.defer import Deferred, FirstError, gatherResults, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from bai_agent.protocol import errors

DEFAULT_INTERVAL = 2.0
#: Clear the screen and go to its top: each view replaces the last on a terminal.
CLEAR = "\x1b[H\x1b[2J"
HEADERS = ("KERNEL", "STATUS", "CPU %", "CORES", "MEM", "MEM %", "PIDS", "AGE", "IMAGE")


@attrs.frozen
class KernelRow:
    """One kernel in the view; None where there is no reading (not sampled yet)."""

    kernel_id: str
    status: str
    image: str
    created_at: float | None
    cpu_percent: float | None  # of one core: 150 is one and a half cores busy
    cpu_granted: float | None
    mem_bytes: float | None
    mem_granted: float | None
    pids: int | None

    @classmethod
    def of(cls, record: dict[str, Any], sample: dict[str, Any] | None) -> KernelRow:
        resources = record.get("resources") or {}
        sample = sample or {}
        return cls(
            kernel_id=str(record.get("kernel_id")),
            status=str(record.get("status", "-")),
            image=str(record.get("image", "-")),
            created_at=_number(record.get("created_at")),
            cpu_percent=_number(sample.get("cpu_util")),
            cpu_granted=_number(resources.get("cpu")),
            mem_bytes=_number(sample.get("mem_bytes")),
            mem_granted=_number(resources.get("mem")),
            pids=int(sample["pids"]) if isinstance(sample.get("pids"), int) else None,
        )


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def busiest_first(rows: Sequence[KernelRow]) -> list[KernelRow]:
    """By CPU, the busiest first; then by memory; kernels without a reading last, by id."""
    return sorted(
        rows,
        key=lambda row: (
            row.cpu_percent is None,
            -(row.cpu_percent or 0.0),
            -(row.mem_bytes or 0.0),
            row.kernel_id,
        ),
    )


def render_top(agent: str, rows: Sequence[KernelRow], now: float, footer: str = "") -> str:
    """The text of one view: a summary line, then the kernels' table, busiest first."""
    ordered = busiest_first(rows)
    cores = sum((row.cpu_percent or 0.0) for row in rows) / 100
    memory = sum((row.mem_bytes or 0.0) for row in rows)
    at = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%H:%M:%S UTC")
    lines = [
        f"{agent}: {len(rows)} kernel(s), {_cores(cores)} cores busy, {size(memory)} of memory in use, at {at}"
        + (f"  {footer}" if footer else ""),
        "",
    ]
    table: list[Sequence[str]] = [HEADERS]
    for row in ordered:
        table.append(
            (
                row.kernel_id,
                row.status,
                "-" if row.cpu_percent is None else f"{row.cpu_percent:.1f}%",
                f"{_cores(None if row.cpu_percent is None else row.cpu_percent / 100)}/{_cores(row.cpu_granted)}",
                f"{size(row.mem_bytes)}/{size(row.mem_granted)}",
                _share(row.mem_bytes, row.mem_granted),
                "-" if row.pids is None else str(row.pids),
                age(None if row.created_at is None else now - row.created_at),
                row.image,
            )
        )
    if len(table) == 1:
        return "\n".join(lines + ["no kernels"]) + "\n"
    widths = [max(len(cells[index]) for cells in table) for index in range(len(HEADERS))]
    numeric = {2, 3, 4, 5, 6, 7}  # right-aligned, as numbers are
    for cells in table:
        lines.append(
            "  ".join(
                cell.rjust(width) if index in numeric else cell.ljust(width)
                for index, (cell, width) in enumerate(zip(cells, widths))
            ).rstrip()
        )
    return "\n".join(lines) + "\n"


def size(value: float | None) -> str:
    """Bytes as docker stats shows them: 512KiB, 3.5MiB, 12GiB."""
    if value is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            amount = value / scale
            return f"{amount:.1f}{unit}" if amount < 10 else f"{amount:.0f}{unit}"
    return f"{value:.0f}B"


def age(seconds: float | None) -> str:
    """How long a kernel has lived: 45s, 12m, 3h04m, 2d03h."""
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _cores(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}".rstrip("0").rstrip(".") or "0"


def _share(part: float | None, whole: float | None) -> str:
    if part is None or not whole:
        return "-"
    return f"{100 * part / whole:.1f}%"


# -- the view, live ------------------------------------------------------------------------


#: What ``fetch_rows`` has of a kernel that ended between ListKernels and GetKernelStats.
_GONE = object()


def _no_sample(failure: Failure) -> object:
    # Ended meanwhile: left out; any other refusal (not running yet, ...): no reading.
    return _GONE if failure.trap(errors.KernelNotFound, errors.AgentError) is errors.KernelNotFound else None


@inlineCallbacks
def fetch_rows(client: Any) -> Generator[Deferred[Any], Any, list[KernelRow]]:
    """The kernels of ``client``'s agent with their latest samples, asked all at once."""
    records = yield client.list_kernels()
    calls = [client.get_kernel_stats(record["kernel_id"]).addErrback(_no_sample) for record in records]
    try:
        samples = yield gatherResults(calls, consumeErrors=True)
    except FirstError as e:
        e.subFailure.raiseException()  # the connection's failure itself, not gatherResults' wrapper
    return [KernelRow.of(record, sample) for record, sample in zip(records, samples) if sample is not _GONE]


@inlineCallbacks
def top(
    clock: IReactorTime, client: Any, args: argparse.Namespace, out: IO[str]
) -> Generator[Deferred[Any], Any, None]:
    """
    ``top``'s views on ``out``: one with ``--once``, else one every ``--interval`` seconds
    on ``clock`` for as long as the process runs (Ctrl-C stops the reactor, and the
    command with it: exit status 0). On a terminal each view replaces the last.
    """
    interval = float(getattr(args, "interval", DEFAULT_INTERVAL))
    live = not args.once
    terminal = live and out.isatty()
    footer = f"every {interval:g} s, Ctrl-C to quit" if live else ""
    first = True
    while True:
        rows = yield fetch_rows(client)
        view = render_top(args.agent, rows, clock.seconds(), footer)
        if terminal:
            view = CLEAR + view
        elif not first:
            view = "\n" + view
        out.write(view)
        out.flush()
        first = False
        if not live:
            return
        yield deferLater(clock, interval, lambda: None)
