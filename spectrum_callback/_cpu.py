"""CPU threads for a scan: the cores other processes leave idle, sampled from /proc.

The analyzer runs a CPU scan of more than a few milliseconds on :func:`idle_cpu_threads`
threads, set around each chunk of the scan by :func:`torch_threads`.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Optional

import torch

__all__ = ["busy_cores_of_other_processes", "idle_cpu_threads", "torch_threads"]


def _cpu_jiffies():
    """(busy jiffies of the whole machine, jiffies of this process, all jiffies) from /proc."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    busy = sum(fields[:3]) + sum(fields[5:8])
    with open("/proc/self/stat") as fh:
        own = fh.read().rsplit(")", 1)[1].split()
    mine = int(own[11]) + int(own[12])  # utime + stime, all threads of this process
    return busy, mine, sum(fields[:8])


def busy_cores_of_other_processes(window_s: float = 0.05) -> Optional[float]:
    """Cores that other processes keep busy now, sampled over ``window_s`` from /proc
    (Linux); ``None`` where /proc cannot be read.  This process's own threads (the
    Trainer's, paused while the callback scans) do not count."""
    try:
        b0, m0, t0 = _cpu_jiffies()
        time.sleep(window_s)
        b1, m1, t1 = _cpu_jiffies()
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    cores = os.cpu_count() or 1
    return max(0.0, (b1 - b0) - (m1 - m0)) / (t1 - t0) * cores


def idle_cpu_threads(max_threads: Optional[int] = None) -> int:
    """Threads worth using on this machine now: torch's setting (or ``max_threads``),
    lowered to the cores other processes leave idle and shared between the ranks of
    this machine.  At least 1.

    OpenMP threads on cores that another process keeps busy make LAPACK 10-25x slower,
    so this matters on shared machines.  "Busy" is sampled from /proc for 50 ms,
    leaving out this process's own threads. Where /proc is unavailable, the 1-minute
    load average stands in, with this process counted as one busy core."""
    n = max_threads or torch.get_num_threads()
    cores = os.cpu_count() or n
    others = busy_cores_of_other_processes()
    if others is None:
        try:
            others = max(os.getloadavg()[0] - 1.0, 0.0)
        except (AttributeError, OSError):  # pragma: no cover - not on every platform
            others = 0.0
    idle = int(cores - others + 0.5)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(n, idle, cores // max(local, 1)))


@contextlib.contextmanager
def torch_threads(n: Optional[int]):
    """torch runs on ``n`` threads inside (``None``: unchanged)."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
