"""OpenMP's wait policy is chosen from the CPU's load at import, and a user's own setting always wins."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from wf_pipeline.openmp_wait import IDLE_SPIN_COUNT, busy_cores, choose_wait, proc_stat_times


def test_idle_cpu_gets_a_short_spin() -> None:
    env: dict[str, str] = {}
    said = choose_wait(env, busy=lambda: 0.1)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": str(IDLE_SPIN_COUNT)}
    assert "short spin" in said


@pytest.mark.parametrize("cores", [0.5, 1.7])
def test_busy_cpu_waits_passively(cores: float) -> None:
    env: dict[str, str] = {}
    said = choose_wait(env, busy=lambda: cores)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert said.startswith("passive") and f"{cores:.1f}" in said


def test_unknown_load_waits_passively() -> None:
    env: dict[str, str] = {}
    assert choose_wait(env, busy=lambda: None).startswith("passive")
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize("user", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}])
def test_user_setting_wins_and_no_probe_runs(user: dict[str, str]) -> None:
    env = dict(user)

    def probe() -> float:
        raise AssertionError("the CPU must not be probed when the user chose")

    said = choose_wait(env, busy=probe)
    assert env == user and said.startswith("user:")


def test_busy_cores_from_two_readings() -> None:
    readings = iter([(100.0, 1000.0), (160.0, 1200.0)])  # 60 of 200 jiffies busy
    cores = busy_cores(read=lambda: next(readings), sleep=lambda _s: None, cpus=2)
    assert cores == pytest.approx(0.6)
    assert busy_cores(read=lambda: None, sleep=lambda _s: None) is None


def test_proc_stat_reading_is_sane() -> None:
    times = proc_stat_times()
    if times is None:
        pytest.skip("no /proc/stat on this platform")
    busy, total = times
    assert 0 <= busy <= total


def test_import_sets_the_policy_before_torch_and_records_it() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import wf_pipeline, os, sys; assert 'torch' not in sys.modules; "
            "print(os.environ['OMP_WAIT_POLICY']); print(wf_pipeline.OPENMP_WAIT)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    policy, said = out.stdout.splitlines()
    assert policy == "PASSIVE" and (said.startswith("passive") or said.startswith("short spin"))
