"""Worker processes: how many CPUs there are, a forked pool for CPU-bound C code (beam search, FLAC cutting), and the
signals a training run's workers leave to their main process."""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor


# what a scheduler sends to stop a job (SLURM at the time limit or on preemption; some sites SIGUSR1 ahead of it),
# and Ctrl-C (SIGINT: a terminal sends it to its foreground process group, torchrun passes it on to its workers)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def leave_stop_signals_to(main_pid: int, worker_id: int | None = None) -> None:
    """In a DataLoader worker (its `worker_init_fn`): the stop signals, which SLURM and torchrun send to every process
    of a job and a terminal's Ctrl-C to every process in its foreground, are for the main process, which finishes its
    step and writes a checkpoint on them (d2v.train.preemption); a worker dead of SIGTERM (or ended by
    KeyboardInterrupt) would fail that step. A thread takes them instead, and ends the worker only on one the main
    process sent: the DataLoader, or multiprocessing at exit, terminating it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # threads started from here on inherit the mask

    def take() -> None:
        while True:
            received = signal.sigwaitinfo(STOP_SIGNALS)
            if received.si_pid == main_pid:
                os._exit(128 + received.si_signo)

    threading.Thread(target=take, name="stop-signals", daemon=True).start()


def worker_init_for_stops() -> Callable[[int], None]:
    """A DataLoader's `worker_init_fn` that leaves the stop signals to this process (`leave_stop_signals_to`). It
    makes multiprocessing's temp dir here first: a worker sends batches through a socket in that dir, and forked
    workers then share this process's, which its exit removes. A worker's own would stay behind in /tmp: at this
    process's exit multiprocessing terminates its daemonic workers, and `os._exit` skips their finalizers."""
    multiprocessing.util.get_temp_dir()
    return functools.partial(leave_stop_signals_to, os.getpid())


def usable_cpus() -> int:
    """The CPUs this process may run on (a batch scheduler's allocation, where it sets the affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def forked_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()
                ) -> Iterator[ProcessPoolExecutor]:
    """A pool of `workers` forked processes. Fork, not spawn: the workers inherit what the parent loaded (a KenLM
    model, shared page by page) and start at once, where spawn would import the parent's `__main__` (torch) again
    in each. Callers run only C code on plain data in them (no torch kernels, no locks of the parent's threads),
    which is what makes Python 3.12's warning about forking a threaded process moot. A worker that dies fails the
    pool (BrokenProcessPool), where multiprocessing.Pool would wait forever."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks",
                                category=DeprecationWarning)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=initializer,
                                 initargs=initargs) as pool:
            yield pool
