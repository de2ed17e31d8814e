"""Host-side stages of the CPU placement: resizing DALI's crops, and producing batches ahead.

On a GPU the whole train path is DALI's graph plus a few dozen batched kernels launched from
the training thread. On a CPU, DALI's cubic resampler is slow (pipeline.py), so crops are
resized here with torch's PIL-equivalent uint8 kernel, and the per-batch work (DALI's run,
the resizes, RandAugment, normalisation) runs in one background thread a few batches ahead of
the trainer: the training thread then only mixes and trains, and the DALI worker threads, this
thread and the trainer keep the cores busy together instead of taking turns.
"""
from __future__ import annotations

import collections
import inspect
import queue
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F


def resize_crops(crops, flips: np.ndarray, size: int, pin: bool = False, slices: int = 1,
                 run_all: Optional[Callable[[List[Callable[[], None]]], None]] = None) -> torch.Tensor:
    """DALI's CPU crops (a TensorList of uint8 HWC, varying sizes) -> uint8 [B, size, size, 3],
    mirrored where flips[i]. torch's uint8 antialiased bicubic is PIL's resampling (at most one
    level apart from PIL's resize), about 0.2-0.4 ms per ImageNet crop. pin: write the batch into
    pinned memory, for a copy to the GPU that does not block (transfer.py). slices > 1: the
    images are resized in that many interleaved slices by run_all, which runs a list of
    independent calls and returns when all are done (BackgroundBatches' share-out)."""
    out = torch.empty((len(crops), size, size, 3), dtype=torch.uint8, pin_memory=pin)

    def resize(indices) -> None:
        for i in indices:
            crop = torch.from_numpy(np.asarray(crops[i]))      # zero-copy view of DALI's buffer
            chw = crop.permute(2, 0, 1).unsqueeze(0)            # [1, 3, h, w], channels-last
            resized = F.interpolate(chw, size=(size, size), mode="bicubic", antialias=True)
            if flips[i]:
                resized = resized.flip(-1)
            out[i] = resized[0].permute(1, 2, 0)

    if slices <= 1 or run_all is None:
        resize(range(len(crops)))
    else:  # interleaved: crop sizes vary with the random area, so contiguous runs would not balance
        run_all([lambda k=k: resize(range(k, len(crops), slices)) for k in range(slices)])
    return out


class BackgroundBatches:
    """Produces the batches of a plan of keys, in order, ahead of the consumer.

    read(key, run_all) runs in one feeder thread, key after key (it drives DALI, whose
    pipeline is not thread-safe and whose output buffers are only valid until its next run);
    run_all(calls) lets it spread independent work on those buffers (the resizes) over
    itself and the pool's threads, and returns when all of it is done. Then finish(key,
    read's result) runs in the pool of `workers` threads, so consecutive batches are finished
    in parallel. At most `depth` batches wait ahead of get(). An exception in read or finish
    is re-raised by the get() of that key. close() stops the feeder, waits for the calls in
    flight and joins every thread.

    The plan is `keys`, then whatever extend() adds while it is open (`open=True`): the train
    loader plans the next epoch's batches this way, so the feeder goes on into them as soon as
    it has read the last of the current epoch, instead of the cores idling while the trainer
    takes the last batches and a new producer starts from nothing. end_plan() says nothing more
    comes; the feeder then ends after the last planned key.

    Bound methods are held weakly by the threads, so an owner dropped without close() is still
    collected (its finaliser closes this) instead of being kept alive by its own threads.
    """

    def __init__(self, read: Callable[[Any, Callable], Any], finish: Callable[[Any, Any], Any],
                 keys: Iterable, depth: int, workers: int = 1, open: bool = False):
        self._queue: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._plan = collections.deque(keys)
        self._plan_open = open
        self._planned = threading.Condition()
        self._waiting = False           # the feeder has read every planned key and waits for more
        self._pool_threads: set = set()  # idents, so close() never waits on its own thread
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="fastdeit-finish",
                                        initializer=_remember_thread, initargs=(self._pool_threads,))
        refs = tuple(weakref.WeakMethod(f) if inspect.ismethod(f) else (lambda f=f: f)
                     for f in (read, finish))
        self._thread = threading.Thread(target=self._run, args=(refs,), name="fastdeit-read", daemon=True)
        self._thread.start()

    def extend(self, keys: Iterable, open: bool = True) -> bool:
        """Add keys to an open plan (False, nothing added, when the plan was ended or the feeder
        has stopped: then the caller starts a new producer). `open=False`: these are the last."""
        with self._planned:
            if not self._plan_open or not self._thread.is_alive() or self._stop.is_set():
                return False
            self._plan.extend(keys)
            self._plan_open = open
            self._planned.notify_all()
            return True

    def end_plan(self) -> None:
        with self._planned:
            self._plan_open = False
            self._planned.notify_all()

    def _next_key(self):
        """The next planned key, or None when the plan is over or the producer is closing."""
        with self._planned:
            while not self._plan and self._plan_open and not self._stop.is_set():
                self._waiting = True
                self._planned.wait(0.05)
            self._waiting = False
            return self._plan.popleft() if self._plan and not self._stop.is_set() else None

    def _run(self, refs) -> None:
        read_ref, finish_ref = refs
        while True:
            key = self._next_key()
            read = read_ref()
            if key is None or read is None:
                return
            try:
                raw = read(key, self._run_all)
                item = (self._pool.submit(_call, finish_ref, key, raw), None)
            except BaseException as e:  # handed to the consumer, which re-raises it
                item = (None, e)
            del read
            while not self._stop.is_set() and read_ref() is not None:
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if item[1] is not None:
                return

    def _run_all(self, calls: List[Callable[[], None]]) -> None:
        """The feeder's share-out: the first call runs here, the others in the pool (after the
        finish calls already queued there); returns when every call has returned, re-raising
        the first error. Pool threads never wait on the feeder, so this cannot deadlock."""
        futures = [self._pool.submit(call) for call in calls[1:]]
        try:
            if calls:
                calls[0]()
        finally:
            for future in futures:
                future.result()

    def get(self) -> Any:
        while True:
            try:
                future, error = self._queue.get(timeout=0.5)
                break
            except queue.Empty:
                # never hang: the feeder ended, or waits for keys nobody planned
                if self._queue.empty() and (not self._thread.is_alive() or self._waiting):
                    raise RuntimeError("the batch producer has no batch left to give (more batches "
                                       "asked for than were planned)")
        if error is not None:
            raise error
        return future.result()

    def close(self) -> None:
        """Also safe from the threads themselves: the owner's finaliser runs in whichever
        thread drops the last reference to it, one of the pool's included."""
        self._stop.set()
        with self._planned:
            self._planned.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()
        own = threading.get_ident() in self._pool_threads
        self._pool.shutdown(wait=not own, cancel_futures=True)


def _remember_thread(idents: set) -> None:
    idents.add(threading.get_ident())


def _call(ref, key: Any, raw: Any) -> Any:
    finish = ref()
    if finish is None:
        raise RuntimeError("the loader was released")
    return finish(key, raw)
