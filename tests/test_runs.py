"""Runs you can trust in CI: one process per run directory, distinct exit codes (gate 1, bad input 2,
crash 3) under plain and multi-process launches, journals that survive a torn line, temp files
cleaned on resume, and a finished run that `--resume` leaves alone."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.cli_helpers import run_cli
from tests.test_distributed import free_port
from wf_pipeline.runtime.atomic_io import append_jsonl, read_jsonl

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny_digits.yaml"
# The shortest whole compress run: one pruning step, one fine-tuning step, a narrow ResNet-20,
# a small test set and a single latency repeat.
QUICK = [
    "model.kwargs={width: 4}", "pruning.schedule.end_epoch=0", "finetune.epochs=1", "finetune.steps_per_epoch=1",
    "pruning.woodfisher.num_grads=16", "data.test_subset=64", "validate.repeats=1", "validate.warmup=0",
    "validate.batch_sizes=[1]",
]
# A user model with a bug: it fails on batches larger than 32 (the first evaluation uses 512).
BUGGY_MODEL = textwrap.dedent("""
    from torch import nn
    from wf_pipeline.models.cifar_resnet import resnet20

    class BigBatchBug(nn.Module):
        def __init__(self, num_classes, in_channels):
            super().__init__()
            self.net = resnet20(num_classes=num_classes, in_channels=in_channels, width=4)

        def forward(self, x):
            if x.shape[0] > 32:
                raise RuntimeError("simulated bug on a large batch")
            return self.net(x)

    def build(num_classes=10, in_channels=1, width=4):
        return BigBatchBug(num_classes, in_channels)
""")


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


# ------------------------------------------------------------------------------------ journal and temp files
def test_journal_reader_drops_a_torn_tail_and_append_cuts_it_off(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    append_jsonl(path, {"step": 0})
    append_jsonl(path, {"step": 1})
    with open(path, "ab") as fh:
        fh.write(b'{"step": 2, "acc')  # a write cut short by a kill
    assert read_jsonl(path) == ([{"step": 0}, {"step": 1}], 0)
    append_jsonl(path, {"step": 2})
    assert path.read_text().splitlines() == ['{"step": 0}', '{"step": 1}', '{"step": 2}']
    with open(path, "ab") as fh:  # a corrupt whole line (not a torn tail) is skipped and counted
        fh.write(b"garbage\n")
    append_jsonl(path, {"step": 3})
    records, bad = read_jsonl(path)
    assert [r["step"] for r in records] == [0, 1, 2, 3] and bad == 1


def test_finished_run_is_not_redone_and_resume_survives_a_torn_journal(tmp_path: Path, capsys, monkeypatch) -> None:
    root = tmp_path / "artifacts"
    first = run_cli(capsys, monkeypatch, "compress", str(TINY), *sets(f"output.root={root}", *QUICK))
    assert first.code == 0, first.err
    run = root / "tiny-digits"
    metrics_before = (run / "metrics.json").read_bytes()
    history_before = (run / "history.jsonl").read_text()

    # --resume of a finished run says so and stops: nothing is redone or rewritten.
    again = run_cli(capsys, monkeypatch, "compress", str(TINY), "--resume", *sets(f"output.root={root}", *QUICK))
    assert again.code == 0 and "already finished" in again.err and len(again.err.strip().splitlines()) == 1
    assert (run / "metrics.json").read_bytes() == metrics_before

    # The state a kill during export leaves: not finished, a torn journal line, half-written temp files.
    (run / "status.json").unlink()
    with open(run / "history.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"kind": "epoch", "epo')
    stale = [run / "export" / ".model.dense.onnx.k2j4x9q1.tmp", run / ".metrics.json.a8b7c6d5.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1024)
    from wf_pipeline.training.gradual import loop

    evaluated: list[object] = []
    real_evaluate = loop.evaluate

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        evaluated.append(args)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", counted)
    resumed = run_cli(capsys, monkeypatch, "compress", str(TINY), "--resume", *sets(f"output.root={root}", *QUICK))
    assert resumed.code == 0, resumed.err
    assert "Traceback" not in resumed.err
    # the dense and final accuracies come from the checkpoint: no model is evaluated again in PyTorch
    assert evaluated == []
    before, after = json.loads(metrics_before), json.loads((run / "metrics.json").read_text())
    assert after["dense_accuracy"] == before["dense_accuracy"] and after["evaluations"] == before["evaluations"]
    assert not any(path.exists() for path in stale)
    assert not list(run.rglob("*.tmp"))
    assert (run / "history.jsonl").read_text() == history_before  # torn line gone, nothing doubled
    assert (run / "status.json").exists()


# ------------------------------------------------------------------------------------ one process per run
HOLDER = textwrap.dedent("""
    import sys, time
    from wf_pipeline.recipe.loader import load_recipe
    from wf_pipeline.runtime.rundir import open_run_dir

    recipe, _ = load_recipe(sys.argv[1], [f"output.root={sys.argv[2]}"])
    open_run_dir(recipe)
    print("holding", flush=True)
    time.sleep(600)
""")


def test_second_process_on_a_live_run_is_refused_and_a_dead_owner_blocks_nothing(tmp_path: Path, capsys,
                                                                                   monkeypatch) -> None:
    root = tmp_path / "artifacts"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(TINY), str(root)], env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stderr is not None
        assert holder.stdout.readline().strip() == "holding", holder.stderr.read()
        for args in (["--resume"], ["--overwrite"]):
            refused = run_cli(capsys, monkeypatch, "compress", str(TINY), *args, *sets(f"output.root={root}", *QUICK))
            assert refused.code == 2, refused.err
            assert error_lines(refused.err) == refused.err.strip().splitlines()  # one line, no traceback
            assert f"in use by pid {holder.pid}" in refused.err
        assert not (root / "tiny-digits" / "history.jsonl").exists()  # the refused runs wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()  # type: ignore[union-attr]
        holder.stderr.close()  # type: ignore[union-attr]
    # The dead owner's lock file is still there; it does not block.
    assert (root / ".tiny-digits.lock").exists()
    resumed = run_cli(capsys, monkeypatch, "compress", str(TINY), "--resume", *sets(f"output.root={root}", *QUICK))
    assert resumed.code == 0, resumed.err
    assert (root / "tiny-digits" / "status.json").exists()


# ------------------------------------------------------------------------------------ exit codes, one process
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    result = run_cli(capsys, monkeypatch, "compress", str(TINY),
                     *sets(f"output.root={tmp_path}", "pruning.woodfisher.damp=0"))
    assert result.code == 2 and error_lines(result.err) == result.err.strip().splitlines() != []
    assert not list(tmp_path.iterdir())


def test_crash_exits_3_with_the_traceback_in_log(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "buggy_model.py").write_text(BUGGY_MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    root = tmp_path / "artifacts"
    result = run_cli(capsys, monkeypatch, "compress", str(TINY), "--trust-recipe-code",
                     *sets(f"output.root={root}", "model.name=buggy_model:build", *QUICK))
    sys.modules.pop("buggy_model", None)
    assert result.code == 3, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "internal error" in lines[0] and "simulated bug" in lines[0], result.err
    log = (root / "tiny-digits" / "log.txt").read_text()
    assert "Traceback (most recent call last)" in log and "RuntimeError: simulated bug on a large batch" in log


def test_interrupted_and_gate_codes_are_distinct_from_input_and_crash() -> None:
    from wf_pipeline import errors

    codes = [errors.EXIT_OK, errors.EXIT_GATE_FAILED, errors.EXIT_BAD_INPUT, errors.EXIT_CRASH, errors.EXIT_INTERRUPTED]
    assert len(set(codes)) == len(codes)


# ------------------------------------------------------------------------------------ exit codes under torchrun
def torchrun(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wf_pipeline.runtime.launch", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "wf_pipeline.cli", "compress", str(TINY), *args],
        env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


def assert_no_launcher_traceback(result: subprocess.CompletedProcess[str]) -> None:
    for marker in ("Traceback", "ChildFailedError", "FAILED"):
        assert marker not in result.stderr + result.stdout, result.stderr[-3000:]


def test_torchrun_gate_failure_exits_1_and_only_rank_0_writes(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    result = torchrun(tmp_path, *sets(f"output.root={root}", *QUICK, "validate.gates.min_accuracy=0.9999"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert_no_launcher_traceback(result)
    assert "deployment gates failed: min_accuracy" in result.stderr
    run = root / "tiny-digits"
    log = (run / "log.txt").read_text()
    assert log.count("dense accuracy") == 1  # rank 1 wrote nothing
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    metrics = json.loads((run / "metrics.json").read_text())
    prune_records = [r for r in history if r["kind"] == "prune"]
    assert len(history) == 2 and len(prune_records) == 1
    # metrics.json counts the gradients of both ranks, as history.jsonl does
    assert metrics["prune_reports"][0]["num_grads"] == prune_records[0]["num_grads"] == 16


def test_torchrun_bad_input_exits_2_with_one_line(tmp_path: Path) -> None:
    result = torchrun(tmp_path, *sets(f"output.root={tmp_path / 'artifacts'}", "pruning.woodfisher.damp=0"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert_no_launcher_traceback(result)
    assert len(error_lines(result.stderr)) == 1 and "pruning.woodfisher.damp" in result.stderr
    assert not (tmp_path / "artifacts").exists()


def test_torchrun_crash_exits_3_with_the_traceback_in_log(tmp_path: Path) -> None:
    (tmp_path / "buggy_model.py").write_text(BUGGY_MODEL)
    root = tmp_path / "artifacts"
    result = torchrun(tmp_path, "--trust-recipe-code",
                      *sets(f"output.root={root}", "model.name=buggy_model:build", *QUICK))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "ChildFailedError" not in result.stderr and "Traceback" not in result.stderr  # issue 20: no rank's
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("error: rank ") for line in lines), result.stderr[-3000:]  # one per rank
    assert any("internal error" in line and "simulated bug" in line for line in error_lines(result.stderr))
    assert "RuntimeError: simulated bug on a large batch" in (root / "tiny-digits" / "log.txt").read_text()


RANK_1_BUG = textwrap.dedent("""
    import os
    from torch import nn
    from wf_pipeline.models.cifar_resnet import resnet20

    class RankOneBug(nn.Module):
        def __init__(self, num_classes, in_channels):
            super().__init__()
            self.net = resnet20(num_classes=num_classes, in_channels=in_channels, width=4)

        def forward(self, x):
            if self.training and os.environ.get("RANK") == "1":
                raise RuntimeError("simulated bug on rank 1")
            return self.net(x)

    def build(num_classes=10, in_channels=1, width=4):
        return RankOneBug(num_classes, in_channels)
""")


def test_torchrun_crash_on_rank_1_prints_one_line_and_logs_its_traceback(tmp_path: Path) -> None:
    """Issue 20: rank 1's traceback went to the terminal (60 lines); now it is in log.txt under its rank."""
    (tmp_path / "rank_one_bug.py").write_text(RANK_1_BUG)
    root = tmp_path / "artifacts"
    result = torchrun(tmp_path, "--trust-recipe-code",
                      *sets(f"output.root={root}", "model.name=rank_one_bug:build", *QUICK))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert any(line.startswith("error: rank 1: internal error") and "simulated bug on rank 1" in line
               for line in lines), result.stderr[-3000:]
    assert all(line.startswith("error: rank ") for line in lines), result.stderr[-3000:]  # one line per rank
    log = (root / "tiny-digits" / "log.txt").read_text()
    assert "rank 1 crashed" in log and "RuntimeError: simulated bug on rank 1" in log


def test_launcher_reports_the_worker_that_failed_by_itself() -> None:
    """On a loaded machine the agent's SIGTERM of the other rank can carry the earlier timestamp."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from wf_pipeline.runtime.launch import _reported_failure

    def failure(rank: int, code: int, when: float) -> ProcessFailure:
        f = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="")
        f.timestamp = when  # type: ignore[assignment]
        return f

    killed_first = ChildFailedError("x", {1: failure(1, -15, 10), 0: failure(0, 2, 11)})
    assert _reported_failure(killed_first)[0] == 0
    only_signals = ChildFailedError("x", {1: failure(1, -9, 10), 0: failure(0, -15, 11)})
    assert _reported_failure(only_signals)[0] == 1


def test_a_rank_that_fails_first_leaves_the_report_to_rank_0(monkeypatch) -> None:
    """Rank 1 exiting first with the shared input error would get rank 0 killed before it printed the
    line (seen in CI as exit 2 with an empty stderr): rank 1 waits, and speaks only if still alive."""
    from wf_pipeline import cli

    waits: list[float] = []
    monkeypatch.setattr(cli.time, "sleep", waits.append)
    monkeypatch.setenv("RANK", "0")
    assert cli._report_prefix(2) == "" and waits == []
    monkeypatch.setenv("RANK", "1")
    assert cli._report_prefix(0) is None and waits == []  # rank 0 reports a finished run; nothing races
    assert cli._report_prefix(2) == "rank 1: " and waits == [cli._RANK_0_REPORT_WAIT_S]
