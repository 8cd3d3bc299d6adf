"""Image checks in worker processes, fed from the event loop without threads.

Decoding (JPEGs the structure walk does not vouch for, other formats) and resizing take 0.3 ms
or more of CPU per photo, so they run in worker processes on the other cores.
`ProcessPoolExecutor` hands every task through a feeder thread and back through a result thread;
in the event-loop process that hand-off cost 0.3 ms of CPU per image, as much as the decode
itself. Here each worker has a pipe in each direction, read by the event loop directly, and the
requests of one loop turn go out as one message.

A worker that dies (a decoder crash on a hostile file) fails only the files it held, as
`decode_error`, and is replaced; ProcessPoolExecutor would have broken the pool and the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pickle
import sys
from typing import Any

from gbif_assets.fetch.pipes import FRAME, Batcher, child_fds, receive, send, start_child
from gbif_assets.fetch.verify import Verified, die_with_parent, verify_image

MODULE = "gbif_assets.fetch.workers"


class _Worker:
    """One worker process and the checks it holds."""

    def __init__(self, process: asyncio.subprocess.Process, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:  # fmt: skip
        self.process, self.reader, self.writer = process, reader, writer
        self.pending: dict[int, asyncio.Future[Verified]] = {}
        self.requests = Batcher(lambda batch: send(writer, batch))
        self.reading: asyncio.Task[None] | None = None


class VerifyPool:
    """`await pool.verify(...)` runs `verify_image(...)` in one of `size` worker processes."""

    def __init__(self, size: int) -> None:
        self._size = max(1, size)
        self._workers: list[_Worker] = []
        self._starting: asyncio.Task[None] | None = None
        self._numbers = itertools.count()
        self._closing = False

    async def verify(self, path: str, max_pixels: int, resize_max_side: int | None, decode: bool,
                     sha256: str | None) -> Verified:  # fmt: skip
        """The verdict on the file at `path` (see `verify_image`)."""
        while not self._workers:  # started on first use: a run without decoding never pays for them
            if self._closing:
                raise RuntimeError("the image-check pool is closed")
            if self._starting is None or self._starting.done():
                self._starting = asyncio.create_task(self._fill())
            await asyncio.shield(self._starting)
        worker = min(self._workers, key=lambda w: len(w.pending))
        number = next(self._numbers)
        future: asyncio.Future[Verified] = asyncio.get_running_loop().create_future()
        worker.pending[number] = future
        worker.requests.add((number, (path, max_pixels, resize_max_side, decode, sha256)))
        return await future

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
        code = await worker.process.wait()
        if worker in self._workers:
            self._workers.remove(worker)
        if not self._closing and (self._starting is None or self._starting.done()):
            self._starting = asyncio.create_task(self._fill())  # replace it
        for future in worker.pending.values():  # the files this worker held when it died
            if not future.done():
                future.set_result(
                    Verified(False, "decode_error", f"checking this file stopped its worker process (exit code {code})")
                )
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
            await worker.process.wait()  # reaped while the loop runs: asyncio warns of children it outlives


def _serve(read_fd: int, write_fd: int) -> None:
    """The worker: read a batch of checks, run them, answer with their verdicts as plain tuples."""
    with os.fdopen(read_fd, "rb") as requests, os.fdopen(write_fd, "wb") as answers:
        while len(head := requests.read(FRAME.size)) == FRAME.size:
            batch: list[tuple[int, tuple[Any, ...]]] = pickle.loads(requests.read(FRAME.unpack(head)[0]))
            verdicts = [(number, verify_image(*args).as_tuple()) for number, args in batch]
            data = pickle.dumps(verdicts, protocol=pickle.HIGHEST_PROTOCOL)
            answers.write(FRAME.pack(len(data)) + data)
            answers.flush()


if __name__ == "__main__":
    die_with_parent()
    _serve(*child_fds(sys.argv[1:]))
