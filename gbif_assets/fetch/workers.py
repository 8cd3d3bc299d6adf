"""Image checks in worker processes, fed from the event loop without threads.

Decoding (JPEGs the structure walk does not vouch for, other formats) and resizing take 0.3 ms
or more of CPU per photo, so they run in worker processes on the other cores.
`ProcessPoolExecutor` hands every task through a feeder thread and back through a result thread;
in the event-loop process that hand-off cost 0.3 ms of CPU per image, as much as the decode
itself. Here each worker has a pipe in each direction, read by the event loop directly, and the
requests of one loop turn go out as one message.

A worker that dies (a decoder crash on a hostile file, or its watchdog stopping a check past its
CPU budget) is replaced, and the files it held without a verdict are checked again on the new
one; a file that stops two workers fails as `decode_error`. ProcessPoolExecutor would have broken
the pool and the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pickle
import signal
import sys
import threading
import time
from typing import Any, BinaryIO

from gbif_assets.fetch.pipes import FRAME, Batcher, Child, child_fds, receive, send, start_child
from gbif_assets.fetch.verify import Verified, die_with_parent, verify_image

MODULE = "gbif_assets.fetch.workers"
CHECK_CPU_S = 20.0  # CPU seconds one file's check may take (a 90-megapixel PNG decodes in about 3)
WATCH_EVERY_S = 0.25
TRIES = 2  # a file held by a worker that died is checked again once; the second death fails it


class _Worker:
    """One worker process and the checks it holds."""

    def __init__(self, process: Child, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:  # fmt: skip
        self.process, self.reader, self.writer = process, reader, writer
        self.pending: dict[int, asyncio.Future[Verified | None]] = {}  # None: the worker died
        self.requests = Batcher(lambda batch: send(writer, batch))
        self.reading: asyncio.Task[None] | None = None


class VerifyPool:
    """`await pool.verify(...)` runs `verify_image(...)` in one of `size` worker processes."""

    def __init__(self, size: int, check_cpu_s: float = CHECK_CPU_S) -> None:
        self._size = max(1, size)
        self._check_cpu_s = check_cpu_s
        self._workers: list[_Worker] = []
        self._starting: asyncio.Task[None] | None = None
        self._numbers = itertools.count()
        self._closing = False

    async def verify(self, path: str, max_pixels: int, resize_max_side: int | None, decode: bool,
                     sha256: str | None, formats: tuple[str, ...] | None = None) -> Verified:  # fmt: skip
        """The verdict on the file at `path` (see `verify_image`)."""
        for _ in range(TRIES):
            while not self._workers:  # started on first use: a run without decoding never pays for them
                if self._closing:
                    raise RuntimeError("the image-check pool is closed")
                if self._starting is None or self._starting.done():
                    self._starting = asyncio.create_task(self._fill())
                await asyncio.shield(self._starting)
            worker = min(self._workers, key=lambda w: len(w.pending))
            number = next(self._numbers)
            future: asyncio.Future[Verified | None] = asyncio.get_running_loop().create_future()
            worker.pending[number] = future
            args = (path, max_pixels, resize_max_side, decode, sha256, formats)
            worker.requests.add((number, args, self._check_cpu_s))
            if (verdict := await future) is not None:
                return verdict
        return Verified(False, "decode_error", f"checking this file stopped its worker process {TRIES} times "
                                               f"(over {self._check_cpu_s:g} s of CPU, or a crash)")  # fmt: skip

    async def _fill(self) -> None:
        while len(self._workers) < self._size and not self._closing:
            worker = _Worker(*await start_child(MODULE))
            worker.reading = asyncio.create_task(self._read(worker))
            self._workers.append(worker)

    async def _read(self, worker: _Worker) -> None:
        while (results := await receive(worker.reader)) is not None:
            for number, verdict in results:
                future = worker.pending.pop(number, None)
                if future is not None and not future.done():
                    future.set_result(Verified(*verdict))
        await worker.process.wait()
        if worker in self._workers:
            self._workers.remove(worker)
        if not self._closing and (self._starting is None or self._starting.done()):
            self._starting = asyncio.create_task(self._fill())  # replace it
        for future in worker.pending.values():  # the files this worker held when it died: check them again
            if not future.done():
                future.set_result(None)
        worker.pending.clear()
        worker.writer.close()

    async def close(self) -> None:
        """Let the workers finish and exit (they leave when their input closes)."""
        self._closing = True
        if self._starting is not None:
            with contextlib.suppress(Exception):
                await self._starting
        for worker in list(self._workers):
            worker.requests.flush()
            worker.writer.close()
        for worker in list(self._workers):
            if worker.reading is not None:
                await asyncio.wait([worker.reading])  # done or cancelled (Ctrl-C): either way it is over
            await worker.process.wait()  # reaped: no zombie left


class _Server:
    """The worker's loop: read a batch of checks, run them, answer with their verdicts as plain
    tuples, one message per batch.

    A watchdog thread keeps each check to its CPU budget. Pillow decodes a small file in one C
    call that no signal interrupts, but it lets go of the GIL meanwhile, so the thread can watch
    the process's CPU time: past the budget, it answers the batch so far, with `decode_error` for
    the file at hand, and kills the process. The pool checks the rest of the batch on a new worker.
    """

    def __init__(self, answers: BinaryIO) -> None:
        self.answers = answers
        self.lock = threading.Lock()  # answering: the batch's end, or the watchdog
        self.done: list[tuple[int, tuple[Any, ...]]] = []
        self.current: tuple[int, float, float] | None = None  # number, CPU deadline, budget
        threading.Thread(target=self._watch, daemon=True).start()

    def run(self, batch: list[tuple[int, tuple[Any, ...], float]]) -> None:
        for number, args, cpu_s in batch:
            with self.lock:
                self.current = (number, time.process_time() + cpu_s, cpu_s)
            verdict = verify_image(*args).as_tuple()
            with self.lock:
                self.current = None
                self.done.append((number, verdict))
        with self.lock:
            self._answer()

    def _answer(self) -> None:
        data = pickle.dumps(self.done, protocol=pickle.HIGHEST_PROTOCOL)
        self.answers.write(FRAME.pack(len(data)) + data)
        self.answers.flush()
        self.done = []

    def _watch(self) -> None:
        while True:
            time.sleep(WATCH_EVERY_S)
            with self.lock:
                if self.current is not None and time.process_time() > self.current[1]:
                    number, _, budget = self.current
                    slow = Verified(False, "decode_error", f"checking it took more than {budget:g} s of CPU")
                    self.done.append((number, slow.as_tuple()))
                    self._answer()
                    os.kill(os.getpid(), signal.SIGKILL)


def _serve(read_fd: int, write_fd: int) -> None:
    with os.fdopen(read_fd, "rb") as requests, os.fdopen(write_fd, "wb") as answers:
        server = _Server(answers)
        while len(head := requests.read(FRAME.size)) == FRAME.size:
            server.run(pickle.loads(requests.read(FRAME.unpack(head)[0])))


if __name__ == "__main__":
    die_with_parent()
    _serve(*child_fds(sys.argv[1:]))
