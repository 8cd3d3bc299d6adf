"""Fetch shards in processes of their own: one event loop per core.

One event loop runs on one core. Its per-image work (the HTTP exchange, hashing, the header
check, the temporary file and rename, the attempt row) tops out at about 3,300 images/s with
decoding off on this project's 2-core machines, below what the network and disk allow. So the
coordinator (`FetchEngine.run`) can start shard processes: each runs the same engine for the
hosts routed to it. A host belongs to one shard for the whole run, so per-host limits, pacing
and circuit breakers stay exact; the coordinator keeps each stream's quota and reserve order,
the attempt log and the progress figures.

Parent and shard talk over two pipes (`pipes.py`): jobs in; results and attempt rows out, batched
once per event-loop turn. A shard dies with its parent (PR_SET_PDEATHSIG), so a `kill -9` of a
build leaves no fetch process behind. Started by `RemoteShard` or by
`FetchEngine.shards_started_early`, not by hand.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

from gbif_assets.fetch.engine import (
    Candidate,
    FetchConfig,
    FetchEngine,
    HostShard,
    Outcome,
    fewer_gc_passes,
    socket_buffers_on_heap,
)
from gbif_assets.fetch.pipes import Batcher, Child, child_fds, pipe_streams, receive, send
from gbif_assets.fetch.verify import Verified, die_with_parent

MODULE = "gbif_assets.fetch.shard"
Packed = tuple[int, bool, str | None, tuple[Any, ...] | None, str | None, str | None, Any]


def _pack(number: int, outcome: Outcome) -> Packed:
    """An outcome without its candidate (the coordinator has it) in plain tuples: a third of
    the pickling time of the dataclasses."""
    verified = None if outcome.verified is None else outcome.verified.as_tuple()
    return number, outcome.ok, outcome.file, verified, outcome.source, outcome.error, outcome.fetched_at


def _unpack(packed: Packed, cand: Candidate) -> Outcome:
    _, ok, file, verified, source, error, fetched_at = packed
    return Outcome(cand, ok, file, None if verified is None else Verified(*verified),
                   source, error, fetched_at)  # fmt: skip


class RemoteShard:
    """The coordinator's handle on one shard process: the same surface as an in-process shard."""

    def __init__(
        self,
        process: Child,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        deliver: Callable[[int, Outcome], None],
        log_attempts: Callable[[list[dict[str, Any]]], None],
    ) -> None:
        self._process, self._reader, self._writer = process, reader, writer
        self._deliver, self._log_attempts = deliver, log_attempts
        self._jobs = Batcher(lambda jobs: send(writer, ("jobs", jobs)))
        self._pending: dict[int, Candidate] = {}
        self.host_report: dict[str, dict[str, Any]] = {}

    @classmethod
    async def start(
        cls,
        config: FetchConfig,
        deliver: Callable[[int, Outcome], None],
        log_attempts: Callable[[list[dict[str, Any]]], None],
        started: Child | None = None,
    ) -> RemoteShard:
        """Give a shard process its `config` (its share of the concurrency): one `started`
        early (see `FetchEngine.shards_started_early`), or a new one."""
        process = started or Child(MODULE)
        try:
            reader, writer = await process.attach()
        except BaseException:
            process.kill()
            raise
        send(writer, ("config", config))
        return cls(process, reader, writer, deliver, log_attempts)

    def submit(self, number: int, cand: Candidate, url: str, host: str, source: str) -> None:
        self._pending[number] = cand
        self._jobs.add((number, cand, url, host, source))

    def close(self) -> None:
        self._jobs.flush()
        send(self._writer, ("close",))

    async def serve(self) -> None:
        """Deliver results until the shard reports it is done; a shard that dies is an error."""
        while (message := await receive(self._reader)) is not None:
            if message[0] == "results":
                self._log_attempts(message[2])
                for packed in message[1]:
                    self._deliver(packed[0], _unpack(packed, self._pending.pop(packed[0])))
            elif message[0] == "done":
                self._log_attempts(message[2])
                self.host_report = message[1]
                await self._process.wait()
                return
        code = await self._process.wait()
        raise RuntimeError(f"fetch shard process {self._process.pid} exited (code {code}) before finishing its jobs")

    def kill(self) -> None:
        """Stop the process if it still runs (after a failure elsewhere in the run)."""
        self._process.kill()
        self._writer.close()

    async def wait(self) -> None:
        """Until the process has exited (after `kill`, at once)."""
        await self._process.wait()


async def _serve(read_fd: int, write_fd: int) -> None:
    """The shard process: take jobs until told to close, fetch them, send results back."""
    reader, writer = await pipe_streams(read_fd, write_fd)
    first = await receive(reader)
    if first is None:
        return  # started early for a job that did not need it
    if first[0] != "config":
        raise SystemExit("fetch shard: expected its configuration first")
    engine = FetchEngine(first[1])

    def send_results(results: list[Packed]) -> None:
        attempts, engine.attempts = engine.attempts, []
        send(writer, ("results", results, attempts))

    results = Batcher(send_results)
    async with engine.open_session() as session:
        shard = HostShard(
            engine, session, engine.config.concurrency, lambda number, done: results.add(_pack(number, done))
        )
        serving = asyncio.create_task(shard.serve())
        while (message := await receive(reader)) is not None and message[0] == "jobs":
            for job in message[1]:
                shard.submit(*job)
        shard.close()  # told to close, or the coordinator's end is gone
        await serving
    results.flush()
    send(writer, ("done", engine.host_report(), engine.attempts))
    await writer.drain()
    writer.close()


def main(argv: list[str]) -> None:
    die_with_parent()
    socket_buffers_on_heap()
    with fewer_gc_passes():
        asyncio.run(_serve(*child_fds(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
