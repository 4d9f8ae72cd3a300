"""Worker processes for CPU-bound C code (beam search, FLAC cutting): how many CPUs there are, and a forked pool."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor


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
