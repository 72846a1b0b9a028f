"""How OpenMP's threads wait between parallel regions: chosen once, before torch loads, from how busy the CPU is.

GNU OpenMP (torch's CPU thread pool) lets a thread that finishes a parallel region spin for a while before it
sleeps. On a shared CPU that spinning steals the core another process holds: 2-thread torch ops ran 10-100x
slower here with libgomp's default spin. Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) costs every region a
wake-up instead: fine-tuning the bundled ResNet-20 (about 120 small parallel regions per step) took 0.23-0.25 s
per step passive and 0.16-0.19 s with a short spin (``GOMP_SPINCOUNT`` 10k-30k) on an idle 2-core machine,
while with one core held by another process the short spin cost 1.35x (10k) to 2x (30k).
So: passive by default, a short spin when nothing else uses the cores at start-up, and any setting the user
exported wins. Importing this module loads nothing heavy; it must run before torch is imported to take effect.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, MutableMapping

# Spin iterations before a thread sleeps when the CPU is idle: most of the idle-machine gain, a bounded cost
# when another process arrives later (see the module docstring).
IDLE_SPIN_COUNT = 20_000
# Another process counts as present when it keeps this many cores' worth busy during the probe.
BUSY_CORES = 0.5
PROBE_SECONDS = 0.05

CpuTimes = Callable[[], tuple[float, float] | None]


def proc_stat_times() -> tuple[float, float] | None:
    """(busy, total) CPU jiffies summed over all cores from /proc/stat; None where there is none (not Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [float(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    return sum(values) - idle, sum(values)


def busy_cores(read: CpuTimes = proc_stat_times, wait: float = PROBE_SECONDS,
               sleep: Callable[[float], None] = time.sleep, cpus: int | None = None) -> float | None:
    """How many cores' worth other processes keep busy right now (this process sleeps while it looks)."""
    first = read()
    if first is None:
        return None
    sleep(wait)
    second = read()
    if second is None or second[1] <= first[1]:
        return None
    fraction = (second[0] - first[0]) / (second[1] - first[1])
    return fraction * (cpus or os.cpu_count() or 1)


def choose_wait(environ: MutableMapping[str, str], busy: Callable[[], float | None] = busy_cores) -> str:
    """Set OMP_WAIT_POLICY (and GOMP_SPINCOUNT on an idle CPU) in `environ` unless the user set either;
    returns what was decided, in words, for the run's environment.json."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return (f"user: OMP_WAIT_POLICY={environ.get('OMP_WAIT_POLICY', '(unset)')}, "
                f"GOMP_SPINCOUNT={environ.get('GOMP_SPINCOUNT', '(unset)')}")
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    cores = busy()
    if cores is None:
        return "passive (CPU load unknown)"
    if cores >= BUSY_CORES:
        return f"passive (other processes kept {cores:.1f} cores busy at start)"
    environ["GOMP_SPINCOUNT"] = str(IDLE_SPIN_COUNT)
    return f"short spin: GOMP_SPINCOUNT={IDLE_SPIN_COUNT} (CPU idle at start: {cores:.2f} cores busy)"


def apply_at_import() -> str:
    """The package-import hook: decide unless torch is already loaded (then nothing can change)."""
    if "torch" in sys.modules:
        return "torch loaded before wf_pipeline: OpenMP's wait left as it was"
    return choose_wait(os.environ)
