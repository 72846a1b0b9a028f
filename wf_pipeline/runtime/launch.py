"""`wf-torchrun`: torchrun that keeps the CLI's exit codes.

Stock ``torchrun`` turns any failed worker into its own ``ChildFailedError`` traceback and exit code 1,
so a CI job cannot tell a failed deployment gate (1) from bad input (2) or a crash (3). This takes
exactly torchrun's arguments, runs the same elastic agent, and exits with the code of the first
worker that failed (workers already printed their one-line reason), without the agent's traceback:

    wf-torchrun --nproc_per_node 2 -m wf_pipeline.cli compress recipes/default.yaml
"""
from __future__ import annotations

import logging
import signal
import sys
from typing import TYPE_CHECKING

from wf_pipeline.errors import EXIT_BAD_INPUT, EXIT_CRASH, EXIT_GATE_FAILED

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure


def exit_code_of_failure(exitcode: int) -> int:
    """A worker's exit code as this process's: negative codes (killed by signal N) become 128 + N."""
    return 128 - exitcode if exitcode < 0 else exitcode


def _reported_failure(exc: ChildFailedError) -> tuple[int, ProcessFailure]:
    """The failure whose code to exit with: the earliest one that is one of ours (a worker that ended
    by itself with 1, 2 or 3), not a worker the agent killed afterwards, whose timestamp can come first
    on a loaded machine; otherwise the earliest failure."""
    ours = {rank: f for rank, f in exc.failures.items()
            if exit_code_of_failure(f.exitcode) in (EXIT_GATE_FAILED, EXIT_BAD_INPUT, EXIT_CRASH)}
    if not ours:
        return exc.get_first_failure()
    rank = min(ours, key=lambda r: (ours[r].timestamp, r))
    return rank, ours[rank]


def main(argv: list[str] | None = None) -> None:
    # torch loads only here, after wf_pipeline's __init__ (run by the import above) set OMP_WAIT_POLICY.
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The agent logs every worker failure with a banner; the workers' own one-line errors say it better.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = parse_args(argv if argv is not None else sys.argv[1:])
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = _reported_failure(exc)
        code = exit_code_of_failure(failure.exitcode)
        if code not in (EXIT_GATE_FAILED, EXIT_BAD_INPUT, EXIT_CRASH):  # not one of ours: say who died how
            how = f"exit code {code}"
            if failure.exitcode < 0:
                try:
                    how = f"signal {signal.Signals(-failure.exitcode).name}"
                except ValueError:
                    how = f"signal {-failure.exitcode}"
            sys.stderr.write(f"error: worker rank {rank} ended with {how}\n")
        sys.exit(code)
    except SignalException as exc:
        sys.exit(128 + int(exc.sigval))


if __name__ == "__main__":
    main()
