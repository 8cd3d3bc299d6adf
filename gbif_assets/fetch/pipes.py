"""Child processes that talk to the event loop over two pipes, with no thread in between.

Used by the fetch shard processes and the image-check workers. Messages are length-prefixed
pickles. The parent reads and writes through asyncio pipe transports (buffered, so neither side
blocks on the other), and many small messages of one event-loop turn go out as one (`Batcher`).
Children are started with `python -m MODULE READ_FD WRITE_FD --parent PID` and ask the kernel to
kill them when their parent dies, so a `kill -9` of a build leaves no process behind.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import struct
import sys
from collections.abc import Callable
from typing import Any

FRAME = struct.Struct("!I")  # the byte length of the pickle that follows


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


async def start_child(
    module: str,
) -> tuple[asyncio.subprocess.Process, asyncio.StreamReader, asyncio.StreamWriter]:
    """Start `python -m module` with a pipe in each direction; returns it and our two ends."""
    to_child_read, to_child_write = os.pipe()
    from_child_read, from_child_write = os.pipe()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            str(to_child_read),
            str(from_child_write),
            "--parent",
            str(os.getpid()),
            pass_fds=(to_child_read, from_child_write),
            stdin=asyncio.subprocess.DEVNULL,
        )
    except BaseException:
        os.close(to_child_write)
        os.close(from_child_read)
        raise
    finally:
        os.close(to_child_read)
        os.close(from_child_write)
    reader, writer = await pipe_streams(from_child_read, to_child_write)
    return process, reader, writer


def child_fds(argv: list[str]) -> tuple[int, int]:
    """The child's (read, write) pipe ends from its command line."""
    return int(argv[0]), int(argv[1])
