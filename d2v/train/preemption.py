"""Stopping on the cluster's signal. SLURM sends SIGTERM at a job's time limit and on preemption, then SIGKILL after
its KillWait (often 30 s); torchrun forwards SIGTERM to its workers and kills them 30 s later. A training loop under
`StopSignals` records the signal instead of dying of it, finishes the step it is in, writes a checkpoint there (every
rank at the same step) and raises `Interrupted`: the resubmitted job resumes from that step instead of from the last
periodic checkpoint, up to `checkpoint.every` steps back. SIGUSR1 does the same, for sites that send it ahead of
the limit, and so does the first Ctrl-C (SIGINT) at a terminal; a second Ctrl-C aborts at once, as without d2v."""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from d2v.processes import STOP_SIGNALS
from d2v.train.distributed import World


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint at `step`; running the same command again resumes it.
    A process ends with 128 + the signal's number, as one killed by it would, so a scheduler sees the job unfinished."""

    def __init__(self, signum: int, step: int, where: str) -> None:
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; its checkpoint in {where} "
                         "resumes the run: start the same command again")


def report(err: Interrupted, stage: str) -> int:
    """The CLI's ending of a stopped stage: say so once (on the first rank under torchrun); the exit status."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{stage}: {err}", file=sys.stderr)
    return err.exit_code


class StopSignals:
    """While entered, SIGTERM, SIGUSR1 and a first SIGINT are recorded, not fatal; a signal the process ignores
    (a script's background job ignores Ctrl-C) stays ignored. `requested()` is collective: every rank calls it
    once per step, and all get the signal once any rank has caught one, so they stop at the same step. The flag
    travels over a gloo group of its own, on the host: asking costs no device synchronisation under NCCL."""

    def __init__(self, world: World) -> None:
        self.world, self.signum = world, None
        self._group = dist.new_group(backend="gloo") if world.distributed else None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python takes signals in the main thread only
            self._previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS
                              if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _record(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
        if signum == signal.SIGINT:  # the next Ctrl-C is KeyboardInterrupt: a way out of a long step
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if self.world.rank == 0:  # os.write: print() could re-enter the stream a progress bar is writing
                os.write(2, b"\nCtrl-C: stopping after this step, with a checkpoint (Ctrl-C again: at once, without)\n")

    def requested(self) -> int | None:
        """The signal that stops the run, once this rank or any other has caught one; None to go on."""
        if self._group is None:
            return self.signum
        flag = torch.tensor([self.signum or 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item()) or None

    def after_step(self, step: int, steps: int) -> int | None:
        """`requested()` at the end of `step` of `steps`. None after the last step, on every rank alike without asking:
        a run that has finished its steps writes its outputs rather than stopping short of them."""
        return self.requested() if step < steps else None

    def halt(self, signum: int, step: int, checkpoints: Path) -> NoReturn:
        """End the run after the checkpoint of `step` is written: every rank waits for rank 0's write (a rank that
        left first would have torchrun kill the writer), then raises `Interrupted`."""
        if self.world.distributed:
            dist.barrier()
        raise Interrupted(signum, step, str(checkpoints))
