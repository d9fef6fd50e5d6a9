"""Decode worker processes writing whole batches into a shared-memory ring of batch slots.

Why processes (measured, ``bench/RESULTS.md``): the per-image Python around a GIL-releasing
decode (header check, buffer views, corrupt policy, label write: ~10-20 us) serialises on the GIL
when the decode runs in threads of the training process. On a 16-core host the thread-pool
loader reached 12,530 img/s against a 26,193 img/s decode ceiling, and it took the GIL from the
training loop. A process holds its own GIL: N workers scale with N cores, and the training
process only sends one small message per batch and receives one back (~0.1 ms per batch of 128).
FFCV's other answer, compiling the whole batch with numba ``nogil`` around libjpeg-turbo, needs
numba and a libjpeg-turbo build at run time; processes need nothing beyond the standard library.

Layout: ``SharedRing`` is one anonymous shared mapping (``MAP_SHARED | MAP_ANONYMOUS``) holding
``slots`` ``[b, 3, H, W]`` image batches (uint8 for a GPU; float32, normalised by the workers, for
the CPU) and int64 ``[b]`` label rows. It is created before
the workers are forked, so every worker writes into the same physical pages the training
process reads (no copy, no names in /dev/shm, nothing left behind even after ``kill -9``). On CUDA
the mapping is page-locked with ``cudaHostRegister`` (after the fork: see ``SharedRing.pin``), so
the host-to-device copy is a real asynchronous DMA from the very pages the workers wrote.

Each worker owns one duplex pipe; batch ``s`` goes to worker ``s % workers``, so its results come
back in order on its pipe. Workers ignore SIGTERM and SIGINT (a signal to the whole process
group, as torchrun, ``docker stop`` and SLURM send, must reach only the trainer, which saves and
exits cleanly); they exit when told to, when their pipe closes, or when the parent process is
gone (checked every second), and SIGTERM ends them once the training process is exiting.
"""
from __future__ import annotations

import collections
import logging
import mmap
import multiprocessing as mp
import multiprocessing.util
import os
import signal
import weakref
from multiprocessing import connection
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch

from .corrupt import CorruptSampleError

log = logging.getLogger("unpg.loaders")
PARENT_CHECK_S = 1.0  # a worker whose parent died notices within this many seconds
JOIN_TIMEOUT_S = 5.0


# One shared byte, set when this (training) process starts exiting; the page is shared with every
# worker forked after this module was imported. Workers ignore SIGTERM/SIGINT *unless* it is set:
# at exit, multiprocessing terminates daemonic children with SIGTERM and then joins them, which
# would wait forever for a worker that ignores SIGTERM unconditionally.
_EXITING = mmap.mmap(-1, mmap.PAGESIZE)


def _mark_exiting() -> None:
    _EXITING[0] = 1


# exitpriority >= 0 runs in multiprocessing's exit handler *before* it terminates the children.
multiprocessing.util.Finalize(None, _mark_exiting, exitpriority=100)


def _on_stop_signal(signum, frame) -> None:
    if _EXITING[0]:
        os._exit(0)  # the training process is exiting and terminates its workers


def ignore_stop_signals(_worker_id: Optional[int] = None) -> None:
    """Worker init: SIGTERM and SIGINT are for the training process only (a signal to the whole
    process group must not kill the workers under a trainer that saves a checkpoint first); they
    end a worker only once the training process is exiting. Usable as a torch ``DataLoader``
    ``worker_init_fn`` (fork start method: the default on Linux)."""
    signal.signal(signal.SIGTERM, _on_stop_signal)
    signal.signal(signal.SIGINT, _on_stop_signal)


class SharedRing:
    """``slots`` image batches ``[b, 3, H, W]`` (uint8, or float32 already normalised) and label
    rows int64 ``[b]`` in one shared anonymous mapping (see module doc); ``images[k]``/``labels[k]``
    are torch views of slot ``k``.

    The ring also keeps the slots' accounts: ``acquire()`` takes the slot free longest (FIFO: on
    CUDA its device copy was queued longest ago), ``release(k)`` returns one, and ``lease(k)``
    hands slot ``k``'s images to the consumer as a zero-copy tensor whose slot comes back by itself
    once the last tensor viewing it is freed (a float32 batch of 128 is 19 MB: copying it out
    costs the training process ~6 us/image, a third of what the decode workers gain)."""

    def __init__(self, slots: int, batch: int, hw: Tuple[int, int], dtype=np.uint8):
        self.shape = (slots, batch, 3, hw[0], hw[1])
        img_bytes = int(np.prod(self.shape)) * np.dtype(dtype).itemsize
        lab_off = -(-img_bytes // 64) * 64
        self.nbytes = -(-(lab_off + slots * batch * 8) // mmap.PAGESIZE) * mmap.PAGESIZE
        self._mm = mmap.mmap(-1, self.nbytes)  # MAP_SHARED | MAP_ANONYMOUS: shared with forks
        self.np_images = np.frombuffer(self._mm, dtype, int(np.prod(self.shape))).reshape(self.shape)
        self.np_labels = np.frombuffer(self._mm, np.int64, slots * batch, lab_off).reshape(slots, batch)
        self.images = torch.from_numpy(self.np_images)
        self.labels = torch.from_numpy(self.np_labels)
        self.pinned = False
        self._free = collections.deque(range(slots))
        self._leased: set = set()  # slots whose images a consumer still holds

    def acquire(self) -> Optional[int]:
        """The slot free longest, or None when every slot is in use."""
        return self._free.popleft() if self._free else None

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def lease(self, slot: int) -> torch.Tensor:
        """Slot ``slot``'s images as a tensor sharing its memory; the slot is released when the
        tensor and every view of it are gone (whichever thread drops the last one)."""
        arr = self.np_images[slot]  # a new ndarray object: torch.from_numpy keeps exactly it alive
        images = torch.from_numpy(arr)
        self._leased.add(slot)
        weakref.finalize(arr, self._return_lease, slot).atexit = False
        return images

    @property
    def free(self) -> int:
        """How many slots are free now."""
        return len(self._free)

    @property
    def leased(self) -> int:
        """How many slots a consumer still holds."""
        return len(self._leased)

    def _return_lease(self, slot: int) -> None:
        # Runs from the array's deallocation, in whichever thread freed it: set.discard and
        # deque.append are each atomic under the GIL.
        self._leased.discard(slot)
        self._free.append(slot)

    def pin(self) -> None:
        """Page-lock the ring for asynchronous copies. Call it only after forking the workers:
        the CUDA driver may mark page-locked ranges MADV_DONTFORK, so a process forked later
        would not have the ring mapped at all."""
        if self.pinned:
            return
        err = torch.cuda.cudart().cudaHostRegister(self.images.data_ptr(), self.nbytes, 0)
        self.pinned = int(err) == 0
        if not self.pinned:  # still correct: the copies are then synchronous pageable copies
            log.warning("cudaHostRegister of the %d-byte loader ring failed (%s); host-to-device "
                        "copies will not overlap", self.nbytes, err)

    def unpin(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.images.data_ptr())
            self.pinned = False

    def close(self) -> None:
        self.unpin()


def _worker_main(conn, fill: Callable, ring: SharedRing, parent_pid: int) -> None:
    ignore_stop_signals()
    torch.set_num_threads(1)
    while True:
        if not conn.poll(PARENT_CHECK_S):
            if os.getppid() != parent_pid:
                return  # the training process is gone
            continue
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        step, slot, args = msg
        try:
            skipped = fill(*args, ring.np_images[slot], ring.np_labels[slot])
            conn.send((step, None, skipped))
        except Exception as e:  # sent to the training process, which raises it
            conn.send((step, _sendable(e), []))


def _sendable(e: Exception) -> Tuple[bool, str]:
    # (is a CorruptSampleError, message): rebuilt in the training process, whatever ``e`` holds.
    if isinstance(e, CorruptSampleError):
        return True, str(e)
    return False, f"{type(e).__name__}: {e}"


class WorkerPool:
    """``workers`` forked processes filling slots of ``ring`` with ``fill(*args, images_b3HW,
    labels_b) -> skipped`` (any callable: the workers are forked, nothing is pickled but
    ``args``)."""

    def __init__(self, workers: int, fill: Callable, ring: SharedRing, name: str):
        ctx = mp.get_context("fork")
        self.procs: List[Any] = []
        self.conns: List[Any] = []
        self.pending: List[List[int]] = [[] for _ in range(workers)]
        self.broken = False  # a worker died: the owner makes a new pool
        pid = os.getpid()
        for k in range(workers):
            here, there = ctx.Pipe(duplex=True)
            p = ctx.Process(target=_worker_main, args=(there, fill, ring, pid),
                            name=f"{name}-{k}", daemon=True)
            p.start()
            there.close()
            self.procs.append(p)
            self.conns.append(here)
        # Runs before multiprocessing's own exit handler, which would SIGTERM (ignored) and
        # then join the daemonic workers forever.
        self._finalizer = multiprocessing.util.Finalize(self, _shutdown, args=(self.procs, self.conns),
                                           exitpriority=10)

    def submit(self, step: int, slot: int, *args) -> None:
        k = step % len(self.procs)
        try:
            self.conns[k].send((step, slot, args))
        except OSError:  # broken pipe: the worker is gone
            raise self._died(k, step) from None
        self.pending[k].append(step)

    def _died(self, k: int, step: int) -> RuntimeError:
        proc = self.procs[k]
        proc.join(JOIN_TIMEOUT_S)
        self.pending[k].clear()
        self.broken = True
        return RuntimeError(f"loader worker {k} (pid {proc.pid}) died with exit code "
                            f"{proc.exitcode} before finishing batch {step} (a negative code is "
                            f"the signal that killed it: -9 is SIGKILL, often out of memory)")

    def result(self, step: int) -> list:
        """The skipped-sample list of batch ``step``; re-raises the worker's exception."""
        k = step % len(self.procs)
        if not self.pending[k] or self.pending[k][0] != step:
            raise RuntimeError(f"loader worker {k}: batch {step} was not submitted next "
                               f"(pending {self.pending[k]})")
        conn, proc = self.conns[k], self.procs[k]
        # Waits without the GIL; the sentinel wakes us if the worker dies instead of answering.
        connection.wait([conn, proc.sentinel])
        try:
            got, err, skipped = conn.recv()
        except (EOFError, OSError):  # it died: its end of the pipe is closed
            raise self._died(k, step) from None
        self.pending[k].pop(0)
        if got != step:
            raise RuntimeError(f"loader worker {k}: expected batch {step}, got {got}")
        if err is not None:
            corrupt, msg = err
            raise CorruptSampleError(msg) if corrupt else RuntimeError(f"loader worker {k}: {msg}")
        return skipped

    def drain(self) -> None:
        """Wait for every submitted batch (results and errors discarded): the slots are free."""
        for steps in self.pending:
            for step in list(steps):
                try:
                    self.result(step)
                except Exception:
                    pass

    def close(self) -> None:
        self._finalizer()


def _shutdown(procs, conns) -> None:
    for c in conns:
        try:
            c.send(None)
        except (OSError, ValueError):
            pass
    for p in procs:
        p.join(JOIN_TIMEOUT_S)
        if p.is_alive():
            p.kill()  # SIGKILL: SIGTERM is ignored by design
            p.join(JOIN_TIMEOUT_S)
    for c in conns:
        c.close()
