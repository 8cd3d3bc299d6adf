"""Child processes that talk to the event loop over two pipes, with no thread in between.

Used by the fetch shard processes and the image-check workers. Messages are length-prefixed
pickles. The parent reads and writes through asyncio pipe transports (buffered, so neither side
blocks on the other), and many small messages of one event-loop turn go out as one (`Batcher`).
Children are started with `python -m MODULE READ_FD WRITE_FD --parent PID` and ask the kernel to
kill them when their parent dies, so a `kill -9` of a build leaves no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

FRAME = struct.Struct("!I")  # the byte length of the pickle that follows
WAIT_POLL_S = 0.01  # how often `Child.wait` looks whether the process has exited


async def pipe_streams(read_fd: int, write_fd: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over two pipe ends: writes are buffered, so neither side ever blocks."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 30)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0))
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin,
        os.fdopen(write_fd, "wb", 0),  # type: ignore[arg-type]
    )
    return reader, asyncio.StreamWriter(transport, protocol, None, loop)


def send(writer: asyncio.StreamWriter, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(FRAME.pack(len(data)) + data)


async def receive(reader: asyncio.StreamReader) -> Any | None:
    """The next message, or None when the other side has closed its end."""
    try:
        (size,) = FRAME.unpack(await reader.readexactly(FRAME.size))
        return pickle.loads(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        return None


class Batcher:
    """Collects items and sends them as one message at the end of the event-loop turn."""

    def __init__(self, deliver: Callable[[list[Any]], None]) -> None:
        self._deliver = deliver
        self._items: list[Any] = []

    def add(self, item: Any) -> None:
        if not self._items:
            asyncio.get_running_loop().call_soon(self.flush)
        self._items.append(item)

    def flush(self) -> None:
        if self._items:
            items, self._items = self._items, []
            self._deliver(items)


class Child:
    """A child process (`python -m module`) with a pipe in each direction.

    Started from plain code, with or without an event loop (a fetch shard starts while its
    partition is still being planned); its pipes join the loop that uses it (`attach`).
    """

    def __init__(self, module: str) -> None:
        to_child_read, self._write_fd = os.pipe()
        self._read_fd, from_child_write = os.pipe()
        try:
            self._popen = subprocess.Popen(
                [sys.executable, "-m", module, str(to_child_read), str(from_child_write), "--parent", str(os.getpid())],
                pass_fds=(to_child_read, from_child_write),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            os.close(self._write_fd)
            os.close(self._read_fd)
            raise
        finally:
            os.close(to_child_read)
            os.close(from_child_write)
        self.pid = self._popen.pid

    async def attach(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Our two pipe ends as streams of the running loop (they close with them)."""
        fds, self._read_fd, self._write_fd = (self._read_fd, self._write_fd), -1, -1
        if -1 in fds:
            raise RuntimeError(f"child process {self.pid}: its pipes are already attached or closed")
        return await pipe_streams(*fds)

    def alive(self) -> bool:
        return self._popen.poll() is None

    def kill(self) -> None:
        """Stop it now (no-op once it has exited); pipes not yet attached are closed."""
        for fd in (self._read_fd, self._write_fd):
            if fd != -1:
                os.close(fd)
        self._read_fd = self._write_fd = -1
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.kill()

    def stop(self) -> None:
        """Kill it and reap it, outside an event loop."""
        self.kill()
        self._popen.wait()

    async def wait(self) -> int:
        """Its exit code, once it has exited (reaped, so no zombie is left)."""
        while (code := self._popen.poll()) is None:
            await asyncio.sleep(WAIT_POLL_S)
        return code


async def start_child(module: str) -> tuple[Child, asyncio.StreamReader, asyncio.StreamWriter]:
    """Start `python -m module` with a pipe in each direction; returns it and our two ends."""
    child = Child(module)
    try:
        reader, writer = await child.attach()
    except BaseException:
        child.kill()
        raise
    return child, reader, writer


def child_fds(argv: list[str]) -> tuple[int, int]:
    """The child's (read, write) pipe ends from its command line."""
    return int(argv[0]), int(argv[1])
