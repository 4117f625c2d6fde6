"""The worker processes of ``sparkct data prepare``: a process pool whose workers exit when the
process that owns the pool dies, and that survives a worker being killed.

Workers come from a fork server (see :func:`mp_context`). A fork server's children are not children
of the pool's owner: when the owner is SIGKILLed nothing tells them, and they would wait on their
task queue forever (they hold both ends of it), keeping the fork server (which waits for every
holder of its "alive" pipe) and multiprocessing's resource tracker alive too. So every worker
watches a pipe whose only writer is the owner: when the owner dies the pipe reads EOF and the
worker exits, and then the fork server and the resource tracker see their pipes close and exit.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures.process import BrokenProcessPool

from ._util import log

# Modules the fork server imports once, so workers start without importing them again.
PRELOAD = [
    "sparkct.data.preparing",
    "sparkct.data.dicom",
    "sparkct.data.resample",
    "pydicom",
    "pydicom.pixels",
    "pydicom.encaps",
    "scipy.ndimage",
]


def mp_context():
    """Workers come from a fork server that has imported the prepare modules once: safe with threads
    and CUDA in the parent (unlike fork), and later runs in the same process start workers quickly
    (unlike spawn, which re-imports numpy/scipy/pydicom in every worker)."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return mp.get_context("spawn")


def _exit_when_closed(conn) -> None:
    try:
        conn.recv_bytes()  # the owner never sends: this returns only by EOF, when the owner is gone
    except (EOFError, OSError):
        pass
    os._exit(70)


def _worker_init(alive_reader, alive_writer) -> None:
    # A fork-started worker inherits the owner's writer; a fork-server one gets a copy through the
    # pickled arguments. Either way this copy must go, or the pipe never reads EOF.
    alive_writer.close()
    threading.Thread(target=_exit_when_closed, args=(alive_reader,), name="sparkct-parent-watch", daemon=True).start()
    logging.basicConfig(level=logging.WARNING)
    # Keep BLAS/OpenMP in each worker to one thread: the workers are the parallelism.
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(v, "1")


class WorkerPool:
    """``workers`` processes that exit with their owner. ``map`` for independent chunks; ``run`` for
    series jobs, with recovery from a worker that dies (see :meth:`run`). Use as a context manager,
    or call :meth:`close`."""

    def __init__(self, workers: int):
        self.workers = workers
        self._ctx = mp_context()
        self._alive_reader, self._alive_writer = self._ctx.Pipe(duplex=False)
        self._pool = self._new(workers)

    def _new(self, workers: int):
        return cf.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=self._ctx,
            initializer=_worker_init,
            initargs=(self._alive_reader, self._alive_writer),
        )

    def map(self, fn: Callable, *iterables: Iterable):
        return self._pool.map(fn, *iterables)

    def run(
        self,
        fn: Callable,
        jobs: list,
        finish: Callable,
        running: Callable[[object], str],
        on_death: Callable[[object], dict],
    ) -> None:
        """Run fn(job) for every job, calling finish(result) as they complete.

        A worker that dies (killed, out of memory) breaks the pool and takes every job then running
        with it, so the culprit is not known. `running(job)` is the path of a marker file fn keeps
        while it runs the job: each job that was running is retried alone in a one-worker pool (a job
        that kills its worker there is finished with on_death(job); an innocent one just completes),
        and the jobs that had not started go to a fresh pool."""
        todo = list(jobs)
        while todo:
            futs = {self._pool.submit(fn, j): j for j in todo}
            todo = []
            broken = False
            for fut in cf.as_completed(futs):
                try:
                    rec = fut.result()
                except BrokenProcessPool:
                    broken = True
                    continue
                finish(rec)
            if not broken:
                break
            unfinished = [j for f, j in futs.items() if f.exception() is not None]
            log.warning("a worker process died (killed or out of memory); %d series go to new workers", len(unfinished))
            self._pool.shutdown(wait=True, cancel_futures=True)
            suspects = []
            for j in unfinished:
                if os.path.exists(running(j)):  # it was running when the pool broke
                    os.unlink(running(j))
                    suspects.append(j)
                else:
                    todo.append(j)
            for j in suspects:
                solo = self._new(1)
                try:
                    finish(solo.submit(fn, j).result())
                except BrokenProcessPool:
                    try:
                        os.unlink(running(j))
                    except OSError:
                        pass
                    finish(on_death(j))
                finally:
                    solo.shutdown(wait=True, cancel_futures=True)
            self._pool = self._new(self.workers)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._alive_writer.close()
        self._alive_reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
