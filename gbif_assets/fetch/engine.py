"""The image fetch engine: event loops with global and per-host limits, retries, quota.

Peers fail in known ways: gbif-dl stalls on a connection error and has no timeouts, gbifxdl
cannot resume, img2dataset has no per-host limit and no backoff, gbif-image-downloader is
sequential. This engine streams bodies to temporary files (hashing and header-checking them on
the way; decoding, when asked, in a worker process), renames only verified files into place,
replaces dead links from the same stream's reserve, tries GBIF's image cache before giving up,
and logs every attempt. A coordinator keeps the quota; shards (this event loop, and shard
processes for large jobs, see `shard.py`) each own a set of hosts."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import datetime as dt
import functools
import gc
import hashlib
import itertools
import logging
import math
import os
import random
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import aiohttp
from yarl import URL

from gbif_assets.fetch.pipes import Child
from gbif_assets.fetch.safety import (
    ALLOWED_SCHEMES,
    BlockedAddress,
    GuardedResolver,
    host_literal_allowed,
    sniff,
)
from gbif_assets.fetch.verify import Streamed, Verified, settle_streamed
from gbif_assets.fetch.workers import VerifyPool
from gbif_assets.retry_after import retry_after_seconds

log = logging.getLogger(__name__)
MAX_REDIRECTS = 5
SNIFF_BYTES = 16  # enough for every magic number in safety.MAGIC (WebP's is at bytes 8-12)
RATE_LIMIT_EXTRA_TRIES = 6  # a 429 is the host asking for patience, not a broken link
REFUSED_ROUNDS_BEFORE_HOLD = 3  # ...but a host that refused this many rounds of its connections in a row is closed
RETRYABLE = {"timeout", "reset", "truncated", "http_429", "http_5xx", "connect"}
# signs of a host that is down, is not a web server, or cannot be trusted
BREAKER_ERRORS = {"timeout", "connect", "reset", "dns", "protocol", "tls"}
ATTEMPTS_EVERY_S = 0.5  # how often the attempt rows go to `on_attempts` (the partition's journal)
UNPROVEN_BREAKER_FAILURES = 2  # a host that never answered is given up on sooner
SLOW_START = 2  # connections to a host before it has answered
RATE_WINDOW_S = 1.0  # a rate-limiting host's window (at least its Retry-After)
RATE_START = 0.75  # first 429: pace at this share of the answers accepted in the last window
RATE_CUT = 0.95  # pace at most at this share of the lowest rate the host refused
RATE_CLIMB = 0.85  # below that, close this share of the gap every window
RATE_STEP = 0.05  # the pace grows by this share per probe
PROBE_HOLD_S = 15.0  # after a 429, the pace holds this long before growing (doubled per later 429)
PROBE_HOLD_MAX_S = 60.0
MIN_RATE = 0.2
PACE_LOOKAHEAD_S = 0.05  # a worker holds a paced host's next job at most this long before its start
RATE_SIGNAL_ANSWERS = 2  # a 429 cuts only after this many answers per allowed connection in the window
GC_FIRST_THRESHOLD = 10_000  # allocations between the cyclic collector's young passes (see fewer_gc_passes)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
HEAP_BLOCKS_UP_TO = 1 << 20  # see socket_buffers_on_heap
USER_AGENT = "gbif-assets/0.1 (training-set builder; polite: per-host limits, backoff)"


@contextlib.contextmanager
def fewer_gc_passes() -> Iterator[None]:
    """Raise the collector's first threshold while images are fetched, then restore it.

    A fetch allocates dozens of short-lived objects per image (requests, responses, timers,
    attempt rows), so at Python's default of 700 the cyclic collector runs every few images.
    At `GC_FIRST_THRESHOLD` it runs 14 times less often: 3-4% less CPU per image (measured,
    one event loop), and the little cyclic garbage a request leaves still goes within seconds."""
    before = gc.get_threshold()
    gc.set_threshold(max(before[0], GC_FIRST_THRESHOLD), *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def socket_buffers_on_heap() -> None:
    """Have glibc serve blocks up to 1 MiB from the heap in this process, not from fresh mmaps.

    asyncio reads each socket into a new 256 KiB buffer and shrinks it to what arrived. Until
    glibc's dynamic threshold happens to rise past that size, every such buffer is an mmap, a
    page fault for each page the kernel fills, an mremap and a munmap: 10-20 page faults and
    about 50 us of system time per image (measured: 140,000-250,000 minor faults for 10,000
    images, 45,000 with this). glibc raises the threshold itself once a process frees a block
    that large; this makes it so from the start. A no-op on other C libraries."""
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, HEAP_BLOCKS_UP_TO)
    except (ValueError, OSError, AttributeError):  # not glibc, or no confstr name on this platform
        return


@dataclass
class FetchConfig:
    """Engine settings (from the recipe's `download` block and the environment)."""

    concurrency: int = 128
    per_host: int = 8
    timeout_s: float = 30.0
    retries: int = 3
    max_bytes: int = 25_000_000
    resize_max_side: int | None = None
    gbif_image_cache_fallback: bool = True
    image_cache_base: str | None = None
    allow_private_hosts: bool = False
    max_pixels: int = 89_478_485
    user_agent: str = USER_AGENT
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    breaker_failures: int = 5
    breaker_open_s: float = 60.0
    progress_every_s: float = 3.0
    verify_workers: int = 2  # processes decoding images (when decode_check is on) per event loop
    decode_check: bool = True
    processes: int = 1  # event loops, one per process (shards owning disjoint hosts); see run()
    shard_min_candidates: int = 2_000  # below this, starting shard processes costs more than it saves
    formats: tuple[str, ...] | None = None  # image MIME types kept (filters.formats); None: every one verify knows
    # host -> (until, as time.time(); why; paused): hosts skipped from the start, as other labels'
    # runs found them dead or asked to pause (see partition.closed_hosts)
    closed_hosts: dict[str, tuple[float, str, bool]] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    """One media item the manifest offers for a stream."""

    url: str
    url_sha1: str
    gbif_id: str
    stream: str
    rank: int
    selected: bool
    dest_dir: Path


@dataclass
class Outcome:
    """A stored image (ok) or the last failure of a candidate."""

    candidate: Candidate
    ok: bool
    file: str | None = None  # a string: the fetch path builds no Path per image (two before)
    verified: Verified | None = None
    source: str | None = None
    error: str | None = None
    fetched_at: dt.datetime | None = None

    @property
    def path(self) -> Path | None:
        """The stored file."""
        return None if self.file is None else Path(self.file)


@dataclass
class Progress:
    """A snapshot for logs and progress bars."""

    done: int
    target: int
    failed: int
    rate: float
    eta_s: float | None
    failures: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {"done": self.done, "target": self.target, "failed": self.failed, "rate": self.rate,
                "eta_s": self.eta_s, "failures": dict(self.failures)}  # fmt: skip


class _Failure(Exception):
    def __init__(
        self,
        error: str,
        status: int | None = None,
        detail: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail or error)
        self.error, self.status, self.detail, self.retry_after = error, status, detail, retry_after
        self.host: str | None = None  # the host that failed: a redirect's target, not always the link's own


class _Breaker:
    """Per-host circuit breaker: after N consecutive connection-level failures, skip the host
    (after 2 when the host has never answered: a dead host costs one timeout, not five)."""

    def __init__(self, failures: int, open_s: float) -> None:
        self.failures, self.open_s = failures, open_s
        self.count: dict[str, int] = collections.defaultdict(int)
        self.open_until: dict[str, float] = {}
        self.why: dict[str, str] = {}  # host -> why it is closed, for the attempt log
        self.held: set[str] = set()  # hosts closed because they asked to be left alone, not because they failed
        self.inherited: set[str] = set()  # closed from the start by other labels' sightings, not this run's
        self.since: dict[str, float] = {}  # host -> when (time.time()) this run closed it

    def error(self, host: str) -> str:
        """What a candidate skipped at a closed host failed with: `host_paused` when the host asked
        for the pause (its links were not judged), `circuit_open` when it stopped answering."""
        return "host_paused" if host in self.held else "circuit_open"

    def is_open(self, host: str) -> bool:
        until = self.open_until.get(host)
        if until is None:
            return False
        if time.monotonic() >= until:  # half-open: let one request probe the host
            del self.open_until[host]
            self.held.discard(host)
            self.count[host] = self.failures - 1
            return False
        return True

    def hold(self, host: str, seconds: float, why: str, paused: bool = True) -> None:
        """Keep the host closed for `seconds`: it asked for a long pause or refuses everything
        (`paused`: its links are not judged), or another label's run found it dead."""
        self.open_until[host] = max(self.open_until.get(host, 0.0), time.monotonic() + seconds)
        self.why[host] = why
        self.since[host] = time.time()
        self.inherited.discard(host)
        if paused:
            self.held.add(host)

    def state(self, host: str) -> dict[str, Any] | None:
        """The host's closing as wall-clock times, for the labels fetched after this one
        (`closed_hosts`), or None when it is open."""
        left = self.open_until.get(host, 0.0) - time.monotonic()
        if left <= 0 or host in self.inherited:  # another label's sighting is not renewed by skipping it
            return None
        return {"paused": host in self.held, "since": self.since.get(host, time.time()),
                "until": time.time() + left, "why": self.why.get(host, "")}  # fmt: skip

    def record(self, host: str, error: str | None, proven: bool = True) -> None:
        if error in BREAKER_ERRORS:
            self.count[host] += 1
            if self.count[host] >= (self.failures if proven else min(self.failures, UNPROVEN_BREAKER_FAILURES)):
                self.open_until[host] = time.monotonic() + self.open_s
                self.why[host] = f"{self.count[host]} connection failures in a row; skipped for {self.open_s:.0f} s"
                self.since[host] = time.time()
                self.held.discard(host)
                self.inherited.discard(host)
        elif error is None or not error.startswith("http_5"):
            self.count[host] = 0


class _HostLimit:
    """One host's connections and, once it has said 429, its pace.

    Slow start: a host we know nothing about gets `SLOW_START` connections, one more per answer
    (doubling every round trip) up to `per_host`, so a host that hangs holds two slots, not
    eight. The limit never exceeds `per_host`. Every 429 makes the whole host wait out
    Retry-After, and at least `backoff_base_s` (a "Retry-After: 0" is not a licence to hammer);
    so does every 5xx. A host that refuses (429 or 5xx) 3 x per_host requests in a row, with none
    accepted, is closed for the breaker's time (see `FetchEngine._fetch_with_retries`).

    A host that says 429 limits requests per time window, and one connection more or less is a
    large step in rate (at 100 ms a request, one connection is 10 requests/s), so such a host is
    paced: request starts are spaced 1/rate apart. A 429 cuts the pace only when the host
    accepted at least `RATE_SIGNAL_ANSWERS` x `per_host` requests in the last window since any
    pause: a host that refuses sooner (at random, or every Nth request) tells no rate to pace
    to, and the Retry-After pause alone answers it. 429s to requests sent before the last cut
    do not cut again.

    What a cut knows: A, the answers accepted in the window before the 429. The host's own
    window may begin anywhere in ours, so its limit lies between A/2 and A; `refused` keeps the
    lowest rate the host has refused. The first 429 paces at `RATE_START` x A, and the pace
    climbs toward `RATE_CUT` x refused, closing `RATE_CLIMB` of the gap every window. A later
    429 sets refused to the lower of the pace and what the last window took, and paces at
    `RATE_CUT` x refused. At that ceiling the pace holds for `hold_s`, then probes `RATE_STEP`
    higher and holds again; each later cut doubles `hold_s`, since every refused probe costs
    the whole host a Retry-After pause. A late start may take up to half an interval back from
    the next one, so a busy event loop does not slow the pace.
    """

    def __init__(self, ceiling: int, min_pause_s: float, max_pause_s: float) -> None:
        self.ceiling = ceiling
        self.min_pause_s = min_pause_s  # the least pause after a 429 or 5xx, whatever Retry-After says
        self.max_pause_s = max_pause_s  # ...and the most: a longer one closes the host's breaker instead
        self.refused_in_a_row = 0  # 429 and 5xx answers since the last other answer
        self.limit = min(SLOW_START, ceiling)
        self.active = 0
        self.waiting = 0  # requests inside acquire()
        self.peak = 0  # most connections open at once, for logs and tests
        self.answers = 0  # HTTP answers ever received: the host is alive
        self.throttled = 0  # 429 answers
        self.cuts = 0
        self.paused_until = 0.0
        self.resumed_at = 0.0  # when the last Retry-After pause ended
        self.started = 0  # requests started; numbers the tickets
        self.cut_ticket = 0  # requests up to this ticket were in flight at the last cut
        self.rate: float | None = None  # requests per second, once the host has said 429
        self.next_start = 0.0
        self.hold_s = PROBE_HOLD_S
        self.window = RATE_WINDOW_S
        self.refused = math.inf  # the lowest rate the host refused (requests per second)
        self.grow_after = 0.0
        self.accepted: collections.deque[float] = collections.deque()  # recent successes
        self._freed = asyncio.Event()

    def wait_s(self, now: float) -> float | None:
        """Seconds until a request may start (0: now); None while every allowed slot is taken."""
        if self.active >= self.limit:
            return None
        return max(0.0, self.paused_until - now, self.next_start - now)

    def due(self, now: float) -> bool:
        """A paced host's next request may start within one pace interval (at most
        `PACE_LOOKAHEAD_S`) and nobody waits for it: a worker may take it now and wait out the
        rest, so the start is on time even when every worker is busy at that moment."""
        wait = self.wait_s(now)
        return wait is not None and not self.waiting and wait <= min(PACE_LOOKAHEAD_S, 1.0 / (self.rate or math.inf))

    async def acquire(self, closed: Callable[[], bool]) -> int:
        """Wait for a free slot, the end of any Retry-After pause and the pace, or for the host to
        be `closed` (the caller then fails at once, not after the pause); returns a ticket."""
        self.waiting += 1
        try:
            while (wait := self.wait_s(time.monotonic())) != 0.0:
                if closed():  # the caller fails at once and sends nothing: the slot is not counted as used
                    self.active += 1  # (its release comes all the same)
                    return 0
                self._freed.clear()
                with contextlib.suppress(TimeoutError):  # a slot freed, the host closed, or the wait is over
                    await asyncio.wait_for(self._freed.wait(), timeout=wait)
        finally:
            self.waiting -= 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.started += 1
        if self.rate:  # a start that came late may take up to half an interval back from the next
            self.next_start = max(time.monotonic() - 0.5 / self.rate, self.next_start) + 1.0 / self.rate
        return self.started

    def release(self) -> None:
        self.active -= 1
        self._freed.set()

    def wake(self) -> None:
        """Let the requests waiting for this host look again (its breaker has just closed it)."""
        self._freed.set()

    def failed_unanswered(self) -> None:
        """A connection-level failure (timeout, refused, reset) at a host that has never answered:
        no new request starts until those in flight tell whether it answers at all. Otherwise the
        slot the failure freed starts another request before the second failure opens the
        breaker, and a hanging host costs two timeouts instead of one."""
        if not self.answers:
            self.limit = max(1, self.active)

    def _pause(self, now: float, asked_s: float) -> None:
        """Hold every request to the host for what it asked, within [min_pause_s, max_pause_s]:
        "Retry-After: 0" is no licence to hammer, and no request waits an hour inside a run."""
        self.paused_until = max(self.paused_until, now + min(self.max_pause_s, max(self.min_pause_s, asked_s)))

    def answered(self, ticket: int, status: int, retry_after: float | None) -> None:
        """An HTTP answer to request `ticket`: grow the limit; pause the host on a 5xx; pace it on a 429."""
        now = time.monotonic()
        self.answers += 1
        if status >= 500:  # the server is struggling: its whole host waits, as for a 429, but keeps its pace
            self.refused_in_a_row += 1
            self._pause(now, retry_after or 0.0)
            return
        if status != 429:
            self.limit = min(self.ceiling, self.limit + 1)  # slow start
            self.refused_in_a_row = 0
            self.accepted.append(now)
            while self.accepted[0] < now - PROBE_HOLD_MAX_S:
                self.accepted.popleft()
            if self.rate is not None and now >= self.grow_after:
                target = RATE_CUT * self.refused
                if self.rate < target:  # climb toward the refused rate, a share of the gap per window
                    self.rate += (target - self.rate) * RATE_CLIMB
                    self.grow_after = now + self.window
                else:  # probe past it, rarely: a refused probe costs the whole host a pause
                    self.rate *= 1.0 + RATE_STEP
                    self.grow_after = now + self.hold_s
            self._freed.set()
            return
        self.throttled += 1
        self.refused_in_a_row += 1
        if now >= self.paused_until:
            self.resumed_at = self.paused_until  # the last pause was over: requests flowed since
        self._pause(now, 1.0 if retry_after is None else retry_after)
        if ticket <= self.cut_ticket:
            return  # sent before the last cut: that cut already answered this congestion
        self.window = max(RATE_WINDOW_S, retry_after or 0.0)
        answered = sum(1 for t in self.accepted if t >= max(now - self.window, self.resumed_at))
        if answered < RATE_SIGNAL_ANSWERS * self.ceiling:
            return  # too few answers to tell a rate: the pause is the answer
        self.cut_ticket = self.started
        accepted = answered / self.window  # what one window took, even if it took it in less time
        if self.rate is None:  # the host's window may have begun anywhere in ours: its limit is A/2..A
            self.refused = accepted
            self.rate = max(MIN_RATE, RATE_START * accepted)
        else:
            self.refused = min(self.refused, self.rate, accepted)
            self.rate = max(MIN_RATE, RATE_CUT * self.refused)
            self.hold_s = min(PROBE_HOLD_MAX_S, self.hold_s * 2)
        self.cuts += 1
        climbing = self.rate < RATE_CUT * self.refused
        self.grow_after = self.paused_until + (self.window if climbing else self.hold_s)
        log.debug("429: %d connections, %.1f requests/s, hold %.0f s", self.limit, self.rate, self.hold_s)


def _refuse_unless_image(lead: bytes, response: aiohttp.ClientResponse) -> None:
    """Magic bytes, not Content-Type, say what a body is (an HTML page served as image/jpeg is refused)."""
    if sniff(lead) is None:
        kind = "html" if lead.lstrip()[:1] == b"<" else "unknown"
        content_type = response.headers.get("Content-Type")
        raise _Failure("not_image", response.status, f"body is {kind}, not an image (Content-Type {content_type})")


class _Inflater:
    """A body the server compressed although we asked for `identity` (an S3 object stored with
    Content-Encoding: gzip, say): inflated in pieces of at most 64 KB, so a compression bomb meets
    `max_bytes` one piece at a time and never fills memory."""

    PIECE = 1 << 16

    def __init__(self, encoding: str, status: int) -> None:
        self.encoding, self.status = encoding, status
        self._inflate: Any = None

    @classmethod
    def of(cls, response: aiohttp.ClientResponse) -> _Inflater | None:
        """None for a plain body; a failure for an encoding no image host should use."""
        encoding = response.headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("", "identity"):
            return None
        if encoding in ("gzip", "x-gzip", "deflate"):
            return cls(encoding, response.status)
        raise _Failure("not_image", response.status, f"body sent with Content-Encoding {encoding[:40]}, not an image")

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._inflate is None:
            if self.encoding == "deflate":  # meant to be zlib-wrapped; some servers send it raw
                wrapped = len(chunk) > 1 and chunk[0] & 0x0F == 8 and (chunk[0] << 8 | chunk[1]) % 31 == 0
                self._inflate = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
            else:
                self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        pieces = []
        try:
            while True:  # a piece cut at PIECE may have more behind it, even with no input left
                pieces.append(piece := self._inflate.decompress(chunk, self.PIECE))
                chunk = self._inflate.unconsumed_tail
                if not chunk and len(piece) < self.PIECE:
                    break
        except zlib.error as exc:
            raise _Failure("not_image", self.status, f"broken {self.encoding} body ({exc})") from None
        return pieces

    def finished(self) -> bool:
        """The compressed stream reached its end: every byte of the image has been handed out."""
        return self._inflate is not None and self._inflate.eof


def host_of(url: str) -> str:
    """The lower-cased host a request to `url` connects to ('' when it has none or does not parse).

    aiohttp's own parser (yarl) reads it, so the host that is checked, limited and paced is the
    host the request goes to. A URL's authority ends before its third "/", so URLs that share
    that prefix share their host: it is parsed once per prefix."""
    return _host_of_prefix("/".join(url.split("/", 3)[:3]))


@functools.lru_cache(maxsize=1 << 16)
def _host_of_prefix(prefix: str) -> str:
    try:
        return (URL(prefix).raw_host or "").lower()
    except ValueError:  # e.g. an unclosed IPv6 bracket: the attempt fails it as blocked
        return ""


@dataclass
class _Stream:
    """One stream's quota: candidates not yet claimed (rank order), successes, claims in flight."""

    queue: collections.deque[Candidate]
    target: int
    done: int = 0
    claimed: int = 0


class _Coordinator:
    """Claims candidates within each stream's quota and routes each to the shard owning its host.

    A candidate is claimed only while `done + claimed < target`, so a stream never fetches more
    than it needs; a failure frees its claim for the next reserve of the same stream, after GBIF's
    image cache was tried when the recipe allows it. A host belongs to one shard for the whole run
    (the shard that had been given the least work when the host first came up), so per-host
    limits, pacing and breakers are exact even with shards in several processes.
    """

    def __init__(self, engine: FetchEngine, states: list[_Stream]) -> None:
        self._engine = engine
        self._states = states
        self._shards: list[Any] = []
        self._owner: dict[str, int] = {}
        self._load: collections.Counter[int] = collections.Counter()
        self._jobs: dict[int, tuple[_Stream, Candidate, Outcome | None]] = {}
        self._numbers = itertools.count()
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def start(self, shards: list[Any]) -> None:
        self._shards = shards
        for state in self._states:
            self._claim(state)
        self._check_finished()

    def _claim(self, state: _Stream) -> None:
        while state.queue and state.done + state.claimed < state.target:
            cand = state.queue.popleft()
            state.claimed += 1
            self._dispatch(state, cand, cand.url, "publisher", None)

    def _dispatch(self, state: _Stream, cand: Candidate, url: str, source: str, first: Outcome | None) -> None:
        host = host_of(url)
        if host not in self._owner:
            self._owner[host] = min(range(len(self._shards)), key=self._load.__getitem__)
        shard = self._owner[host]
        self._load[shard] += 1
        number = next(self._numbers)
        self._jobs[number] = (state, cand, first)
        self._shards[shard].submit(number, cand, url, host, source)

    def settle(self, number: int, outcome: Outcome) -> None:
        """A shard's result for job `number`: count it, or try the cache, and claim what is next."""
        engine = self._engine
        state, cand, first = self._jobs.pop(number)
        if (
            not outcome.ok
            and first is None
            and outcome.error != "unwanted_format"
            and (cache_url := engine._cache_url(cand))
        ):
            # GBIF's cached copy stands in for a dead link, not for a live one that serves a format
            # the recipe leaves out (a fresh build and a refresh would keep different images)
            self._dispatch(state, cand, cache_url, "gbif_cache", outcome)
            return
        final = outcome if outcome.ok or first is None else first
        if final.ok:
            final = engine.unless_duplicate(final)
        engine.outcomes.append(final)
        state.claimed -= 1
        if final.ok:
            state.done += 1
            engine._done += 1
        else:
            engine.failures[final.error or "error"] += 1
        self._claim(state)
        self._check_finished()

    def _check_finished(self) -> None:
        if not self._jobs and not self.finished.done():
            self.finished.set_result(None)


class HostShard:
    """Fetch jobs for the hosts routed here, in this event loop.

    Jobs wait in their host's queue and `workers` tasks serve the hosts round robin, each taking
    a job only from a host that can take a request now (free slot, no Retry-After pause, pace),
    so a hanging or throttled host delays its own jobs, never the other hosts'.
    """

    def __init__(
        self,
        engine: FetchEngine,
        session: aiohttp.ClientSession,
        workers: int,
        deliver: Callable[[int, Outcome], None],
    ) -> None:
        self._engine, self._session, self._workers, self._deliver = engine, session, workers, deliver
        self._parked: collections.OrderedDict[str, collections.deque[tuple[int, Candidate, str, str, str]]] = (
            collections.OrderedDict()
        )
        self._closing = False
        self._paced: set[str] = set()  # hosts that said 429 and are paced since

    def submit(self, number: int, cand: Candidate, url: str, host: str, source: str) -> None:
        self._parked.setdefault(host, collections.deque()).append((number, cand, url, host, source))
        self._engine._notify()

    def close(self) -> None:
        """No more jobs will come: workers stop once the queues are empty."""
        self._closing = True
        self._engine._notify()

    async def serve(self) -> None:
        await asyncio.gather(*(self._work() for _ in range(self._workers)))

    def _pick(self) -> tuple[tuple[int, Candidate, str, str, str] | None, float | None]:
        """The next job whose host can take a request now; else (None, seconds until one may, if known).

        A paced host (one that said 429) comes first when its turn is due: time it loses waiting
        for a worker can never be made up, while the other hosts' work can run at any moment.
        """
        engine = self._engine
        now, wake = time.monotonic(), None
        for host in self._paced:
            if host in self._parked and engine._host(host).due(now):
                return self._take(host), None
        for host in self._parked:  # a job taken ends the loop, so the dict may change under it
            # an open breaker lets the job start at once: it fails fast without a request
            wait = 0.0 if engine._breaker.is_open(host) else engine._host(host).wait_s(now)
            if wait == 0.0:
                return self._take(host), None
            if wait is not None:
                wake = wait if wake is None else min(wake, wait)
        return None, wake

    def _take(self, host: str) -> tuple[int, Candidate, str, str, str]:
        waiting = self._parked[host]
        job = waiting.popleft()
        if waiting:
            self._parked.move_to_end(host)  # round robin: the other hosts come first next time
        else:
            del self._parked[host]
        return job

    async def _work(self) -> None:
        engine = self._engine
        while True:
            job, wake = self._pick()
            if job is None:
                if self._closing and not self._parked:
                    return
                await engine._wait_change(wake)
                continue
            number, cand, url, host, source = job
            outcome = await engine._fetch_with_retries(self._session, cand, url, host, source)
            if engine._host(host).rate is not None:
                self._paced.add(host)
            self._deliver(number, outcome)
            engine._notify()


class FetchEngine:
    """Fetch candidates stream by stream until each stream's target is met."""

    def __init__(
        self,
        config: FetchConfig,
        progress: Callable[[Progress], None] | None = None,
        on_attempts: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        """`progress` gets a snapshot every `progress_every_s`; `on_attempts` gets the attempt
        rows so far every ATTEMPTS_EVERY_S (to put the new ones on disk as the run goes)."""
        self.config = config
        self.progress_cb = progress
        self.attempts_cb = on_attempts
        self.attempts: list[dict[str, Any]] = []
        self.outcomes: list[Outcome] = []
        self.failures: collections.Counter[str] = collections.Counter()
        self._breaker = _Breaker(config.breaker_failures, config.breaker_open_s)
        for host, (until, why, paused) in config.closed_hosts.items():  # found dead or pausing in other labels
            if (left := until - time.time()) > 0:
                self._breaker.hold(host, left, why, paused)
                self._breaker.inherited.add(host)
        self._hosts: dict[str, _HostLimit] = {}
        self._remote_hosts: dict[str, dict[str, Any]] = {}  # what shard processes learnt of their hosts
        self._literal_ok: dict[str, bool] = {}  # host -> an IP literal we may connect to (or a name)
        self._changed = asyncio.Event()
        self._idle = 0  # workers inside _wait_change
        self._global = asyncio.Semaphore(config.concurrency)
        self._early: list[Child] = []  # shard processes started before `run` (see shards_started_early)
        self._pool: VerifyPool  # one per session (see open_session)
        self._made_dirs: dict[Path, str] = {}  # the folders made so far, as strings
        self._done = 0
        self._target = 0
        self._started = time.monotonic()
        # content hash -> file of the images kept for this job (seeded with those already on disk)
        self.kept_sha256: dict[str, str] = {}

    def unless_duplicate(self, outcome: Outcome) -> Outcome:
        """The outcome, or a `duplicate` failure when its bytes are an image already kept for this
        job (a publisher's "no image" placeholder at many URLs): its file is deleted, and the
        stream's next reserve takes its place, so duplicates never count towards the quota."""
        digest = outcome.verified.sha256 if outcome.verified else None
        if digest is None or self.kept_sha256.setdefault(digest, outcome.file or "") == outcome.file:
            return outcome
        if outcome.file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(outcome.file)
        return Outcome(outcome.candidate, False, source=outcome.source, error="duplicate")

    def _host(self, host: str) -> _HostLimit:
        if host not in self._hosts:
            self._hosts[host] = _HostLimit(self.config.per_host, self.config.backoff_base_s, self.config.backoff_max_s)
        return self._hosts[host]

    def host_report(self) -> dict[str, dict[str, Any]]:
        """What the engine learnt per host: connections allowed and used, 429s, pace, and the
        shard (0: this process) that fetched from it."""
        return {
            host: {
                "limit": h.limit,
                "peak": h.peak,
                "answers": h.answers,
                "throttled": h.throttled,
                "cuts": h.cuts,
                "rate": None if h.rate is None else round(h.rate, 2),
                "shard": 0,
                "closed": self._breaker.state(host),
            }
            for host, h in self._hosts.items()
        } | self._remote_hosts

    def _hold(self, host: str, seconds: float, why: str) -> None:
        """Close the host for `seconds`; requests waiting for its pause give up now."""
        self._breaker.hold(host, seconds, why)
        self._host(host).wake()

    def _notify(self) -> None:
        """Wake workers waiting for a host slot, a pause to end or a stream to change."""
        if self._idle:  # called a few times per image: no event churn while every worker is busy
            self._changed.set()
            self._changed = asyncio.Event()

    async def _wait_change(self, timeout: float | None) -> None:
        event = self._changed
        self._idle += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=1.0 if timeout is None else min(max(timeout, 0.001), 1.0))
        finally:
            self._idle -= 1

    def _log(self, cand: Candidate, url: str, host: str, final_url: str | None, status: int | None, error: str | None,
             size: int, started: float, attempt: int, source: str, detail: str | None = None) -> None:  # fmt: skip
        self.attempts.append(
            {
                "url": cand.url,
                "host": host,
                "final_url": final_url,
                "status": status,
                "error": error,
                "detail": detail,
                "bytes": size,
                "ms": round((time.monotonic() - started) * 1000, 1),
                "attempt": attempt,
                "source": source,
                "stream": cand.stream,
                "gbifID": cand.gbif_id,
                "fetched_at": dt.datetime.now(dt.UTC),
            }
        )

    async def run(self, streams: dict[str, tuple[list[Candidate], int]]) -> list[Outcome]:
        """Fetch every stream to its target; returns the outcome of every tried candidate.

        This process coordinates: it claims candidates in rank order within each stream's quota,
        hands each to the shard that owns its host, and claims the next reserve when one fails.
        Shard 0 runs in this event loop; with `processes` > 1 and a job large enough to pay for
        their start, shards 1.. are processes of their own (`gbif_assets.fetch.shard`), one core each.
        """
        socket_buffers_on_heap()
        with fewer_gc_passes():
            return await self._run(streams)

    async def _run(self, streams: dict[str, tuple[list[Candidate], int]]) -> list[Outcome]:
        self._target = sum(target for _, target in streams.values())
        states = [_Stream(collections.deque(sorted(c, key=lambda c: c.rank)), t) for c, t in streams.values()]
        extra = self._extra_processes(streams)
        share = max(1, -(-self.config.concurrency // (extra + 1)))
        self._global = asyncio.Semaphore(share)
        reporter = asyncio.create_task(self._report_loop())
        shards: list[Any] = []
        serving: list[asyncio.Task[None]] = []
        try:
            async with self.open_session() as session:
                coordinator = _Coordinator(self, states)
                shards.append(HostShard(self, session, share, coordinator.settle))
                if extra:
                    from gbif_assets.fetch.shard import RemoteShard  # it imports this module: loaded on use

                    child = dataclasses.replace(
                        self.config, concurrency=share, verify_workers=max(1, self.config.verify_workers // (extra + 1))
                    )
                    for _ in range(extra):
                        started = self._early.pop() if self._early else None
                        if started is not None and not started.alive():  # died while waiting: start another
                            started.kill()
                            await started.wait()
                            started = None
                        shards.append(await RemoteShard.start(child, coordinator.settle, self.attempts.extend, started))
                serving += [asyncio.create_task(shard.serve()) for shard in shards]
                coordinator.start(shards)
                await asyncio.wait([coordinator.finished, *serving], return_when=asyncio.FIRST_COMPLETED)
                for shard in shards:
                    shard.close()
                await asyncio.gather(*serving)  # a shard that failed raises here
                for index, shard in enumerate(shards[1:], start=1):
                    self._remote_hosts.update({host: r | {"shard": index} for host, r in shard.host_report.items()})
        finally:
            for task in serving:
                task.cancel()
            for shard in shards[1:]:
                shard.kill()  # no-op once a shard process has finished
            for shard in shards[1:]:  # reaped: no zombie left
                await shard.wait()
            for early in self._early:  # more were started early than this job's hosts could use
                early.kill()
                await early.wait()
            self._early.clear()
            reporter.cancel()
            self._emit()
        return self.outcomes

    @contextlib.contextmanager
    def shards_started_early(self, candidates: int) -> Iterator[None]:
        """Start now the shard processes a job of `candidates` candidates may use, so their
        start-up (a Python process importing aiohttp: about 0.3 s of CPU) overlaps the caller's
        planning instead of holding back the hosts routed to them. `run` inside the block uses
        them; those it does not use are stopped on leaving it."""
        from gbif_assets.fetch.shard import MODULE  # it imports this module: loaded on use

        wanted = self.config.processes - 1 if candidates >= self.config.shard_min_candidates else 0
        try:
            for _ in range(wanted):
                self._early.append(Child(MODULE))
            yield
        finally:
            for early in self._early:
                early.stop()
            self._early.clear()

    def _extra_processes(self, streams: dict[str, tuple[list[Candidate], int]]) -> int:
        """Shard processes beyond this one: only for jobs large enough to repay their start-up."""
        wanted = self.config.processes - 1
        if wanted <= 0 or sum(len(c) for c, _ in streams.values()) < self.config.shard_min_candidates:
            return 0
        hosts: set[str] = set()
        for cand in itertools.chain.from_iterable(cands for cands, _ in streams.values()):
            hosts.add(host_of(cand.url))
            if len(hosts) > wanted:
                break  # enough hosts for every process
        return max(0, min(wanted, len(hosts) - 1))

    def _cache_url(self, cand: Candidate) -> str | None:
        """GBIF's cached copy of a publisher's image, when the recipe allows falling back to it."""
        if not (self.config.gbif_image_cache_fallback and self.config.image_cache_base):
            return None
        md5 = hashlib.md5(cand.url.encode("utf-8")).hexdigest()
        return f"{self.config.image_cache_base.rstrip('/')}/occurrence/{cand.gbif_id}/media/{md5}"

    @contextlib.asynccontextmanager
    async def open_session(self) -> AsyncIterator[aiohttp.ClientSession]:
        """The HTTP session (guarded resolver, timeouts, keep-alive pool) and the verify workers."""
        connector = aiohttp.TCPConnector(
            limit=self.config.concurrency,
            limit_per_host=self.config.per_host,
            ttl_dns_cache=300,
            resolver=GuardedResolver(self.config.allow_private_hosts),
            enable_cleanup_closed=True,
        )
        timeout = aiohttp.ClientTimeout(
            total=self.config.timeout_s * 2,
            connect=self.config.timeout_s,
            sock_read=self.config.timeout_s,
        )
        self._pool = VerifyPool(self.config.verify_workers)
        try:
            async with aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                # the stored file is the body as sent: ask for it uncompressed (aiohttp offers gzip by default)
                headers={"User-Agent": self.config.user_agent, "Accept-Encoding": "identity"},
                auto_decompress=False,
            ) as session:
                yield session
        finally:
            await self._pool.close()

    async def _report_loop(self) -> None:
        tick = min(self.config.progress_every_s, ATTEMPTS_EVERY_S) if self.attempts_cb else self.config.progress_every_s
        ticks_per_progress = max(1, round(self.config.progress_every_s / tick))
        for ticks in itertools.count(1):
            await asyncio.sleep(tick)
            if self.attempts_cb is not None:
                self.attempts_cb(self.attempts)
            if ticks % ticks_per_progress == 0:
                self._emit()

    def _emit(self) -> None:
        if self.progress_cb is None:
            return
        elapsed = max(1e-6, time.monotonic() - self._started)
        rate = self._done / elapsed
        left = max(0, self._target - self._done)
        self.progress_cb(
            Progress(
                self._done,
                self._target,
                sum(self.failures.values()),
                rate,
                left / rate if rate else None,
                dict(self.failures),
            )
        )

    async def _fetch_with_retries(
        self, session: aiohttp.ClientSession, cand: Candidate, url: str, host: str, source: str
    ) -> Outcome:
        last: _Failure | None = None
        failures = throttled = 0
        for attempt in itertools.count(1):
            if self._breaker.is_open(host):
                closed = self._breaker.error(host)
                self._log(cand, url, host, None, None, closed, 0, time.monotonic(), attempt, source,
                          self._breaker.why.get(host))  # fmt: skip
                return Outcome(cand, False, error=last.error if last else closed, source=source)
            started = time.monotonic()
            try:
                path, verified, final_url, status = await self._attempt(session, cand, url)
            except _Failure as failure:
                last = failure
                failed = failure.host or host  # a dead redirect target does not close the link's own host
                self._breaker.record(failed, failure.error, proven=self._host(failed).answers > 0)
                if self._breaker.is_open(failed):  # requests waiting for its pause give up now
                    self._host(failed).wake()
                if failure.error in BREAKER_ERRORS:
                    self._host(failed).failed_unanswered()
                self._log(
                    cand,
                    url,
                    host,
                    None,
                    failure.status,
                    failure.error,
                    0,
                    started,
                    attempt,
                    source,
                    failure.detail,
                )
                if failure.error == "http_429":
                    throttled += 1
                    give_up = throttled > self.config.retries + RATE_LIMIT_EXTRA_TRIES
                else:
                    failures += 1
                    give_up = failures > self.config.retries
                refused = self._host(failed).refused_in_a_row if failure.error in ("http_429", "http_5xx") else 0
                if refused >= REFUSED_ROUNDS_BEFORE_HOLD * self._host(failed).limit:  # limit: at most per_host
                    # a host that turns every request away is not pacing us: let reserves elsewhere take over
                    self._hold(failed, self.config.breaker_open_s,
                               f"{refused} requests in a row refused ({failure.error}); skipped for "
                               f"{self.config.breaker_open_s:.0f} s")  # fmt: skip
                    break
                if failure.error not in RETRYABLE or give_up:
                    break
                delay = failure.retry_after
                if delay is not None and delay > self.config.backoff_max_s:
                    # a pause longer than a run waits: leave the host alone until then, and let
                    # reserves on other hosts take its candidates (a later run tries it again)
                    self._hold(failed, delay, f"the host asked for a {delay:.0f} s pause (Retry-After); skipped")
                    break
                if failure.error == "http_429" and delay is not None:
                    continue  # the whole host waits out Retry-After (see _HostLimit.acquire)
                if delay is None:
                    delay = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
                    delay *= 0.5 + random.random() / 2
                await asyncio.sleep(min(delay, self.config.backoff_max_s))
                continue
            self._breaker.record(host, None)
            self._log(cand, url, host, final_url, status, None, verified.size, started, attempt, source)
            return Outcome(
                cand,
                True,
                file=path,
                verified=verified,
                source=source,
                fetched_at=dt.datetime.now(dt.UTC),
            )
        assert last is not None
        return Outcome(cand, False, error=last.error, source=source)

    async def _attempt(
        self, session: aiohttp.ClientSession, cand: Candidate, url: str
    ) -> tuple[str, Verified, str, int]:
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                target = URL(current)  # parsed once: the checks below and the request see the same host
            except ValueError as exc:
                raise _Failure("blocked", detail=f"invalid URL {current[:200]}: {exc}") from None
            if target.scheme not in ALLOWED_SCHEMES:
                raise _Failure("blocked", detail=f"scheme {target.scheme or '(none)'} is not http(s): {current[:200]}")
            host = (target.raw_host or "").lower()
            if host not in self._literal_ok:
                self._literal_ok[host] = host_literal_allowed(host, self.config.allow_private_hosts)
            if not self._literal_ok[host]:
                raise _Failure(
                    "blocked",
                    detail=f"{host} is a loopback, private, link-local or multicast address",
                )
            try:  # a failure at a redirect's target counts against that host (see _Failure.host)
                limit = self._host(host)
                # host first: a busy host never holds global slots
                ticket = await limit.acquire(functools.partial(self._breaker.is_open, host))
                try:
                    async with self._global:
                        if self._breaker.is_open(host):  # opened while this request waited for a slot
                            raise _Failure(self._breaker.error(host), detail=self._breaker.why.get(host))
                        async with session.get(target, allow_redirects=False) as response:
                            refused = response.status == 429 or response.status >= 500
                            retry_after = (
                                retry_after_seconds(response.headers.get("Retry-After"), None) if refused else None
                            )
                            limit.answered(ticket, response.status, retry_after)
                            if refused:
                                kind = "http_429" if response.status == 429 else "http_5xx"
                                raise _Failure(kind, response.status, retry_after=retry_after)
                            if response.status in (301, 302, 303, 307, 308):
                                location = response.headers.get("Location")
                                if not location:
                                    raise _Failure("http_3xx", response.status, "redirect without Location")
                                try:
                                    current = urljoin(current, location)
                                except ValueError as exc:  # the next hop's checks refuse what parses
                                    raise _Failure(
                                        "blocked", response.status, f"redirect to {location[:200]!r}: {exc}"
                                    ) from None
                                continue
                            tmp, status, streamed = await self._download(response, cand)
                            break
                except _Failure:
                    raise
                except BlockedAddress as exc:
                    raise _Failure("blocked", detail=str(exc)) from None
                except aiohttp.ClientConnectorError as exc:
                    if isinstance(exc.os_error, BlockedAddress):
                        raise _Failure("blocked", detail=str(exc.os_error)) from None
                    if isinstance(exc, aiohttp.ClientSSLError):  # a bad certificate stays bad: not retried
                        raise _Failure("tls", detail=str(exc)[:300]) from None
                    kind = "dns" if isinstance(exc, aiohttp.ClientConnectorDNSError) else "connect"
                    raise _Failure(kind, detail=str(exc)[:300]) from None
                except (TimeoutError, aiohttp.ServerTimeoutError) as exc:  # aiohttp names the read and connect timeouts
                    why = str(exc) or f"not finished within {2 * self.config.timeout_s:g} s (the total timeout)"
                    raise _Failure("timeout", detail=why[:300]) from None
                except aiohttp.ClientPayloadError as exc:
                    raise _Failure("truncated", detail=str(exc)[:300]) from None
                except (
                    aiohttp.ServerDisconnectedError,
                    aiohttp.ClientOSError,
                    ConnectionResetError,
                ) as exc:
                    raise _Failure("reset", detail=str(exc)[:300]) from None
                except aiohttp.InvalidURL as exc:
                    raise _Failure("blocked", detail=f"invalid URL {exc}") from None
                except aiohttp.ClientError as exc:  # not HTTP: a bad status line, oversized headers, broken framing
                    raise _Failure("protocol", detail=f"{type(exc).__name__}: {exc}"[:300]) from None
                finally:
                    limit.release()
                    self._notify()
            except _Failure as failure:
                failure.host = failure.host or host
                raise
        else:
            raise _Failure("too_many_redirects", detail=f"more than {MAX_REDIRECTS} redirects from {url[:200]}")
        try:  # verification runs after the connection slot is released
            verified = (
                settle_streamed(streamed, self.config.max_pixels, self.config.decode_check, self.config.formats)
                if streamed.ends
                else None
            )
            if verified is None:
                verified = await self._pool.verify(
                    tmp,
                    self.config.max_pixels,
                    self.config.resize_max_side,
                    self.config.decode_check,
                    streamed.digest.hexdigest(),
                    self.config.formats,
                )
            if not verified.ok:
                raise _Failure(verified.error or "decode_error", status, verified.detail)
            final = f"{os.path.dirname(tmp)}/{cand.url_sha1}.{verified.ext}"
            os.replace(tmp, final)
            return final, verified, current, status
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    async def _download(self, response: aiohttp.ClientResponse, cand: Candidate) -> tuple[str, int, Streamed]:
        """Stream a 200 body to a temporary file next to its final place, within max_bytes,
        hashing it and keeping its first and last bytes on the way."""
        status = response.status
        if status not in (200, 203):  # 203: a transforming proxy's 200; 429 and 5xx were answered in _attempt
            raise _Failure(f"http_{status}", status)
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.config.max_bytes:
            raise _Failure("too_large", status, f"Content-Length {length} > max_bytes {self.config.max_bytes}")
        if (folder := self._made_dirs.get(cand.dest_dir)) is None:
            cand.dest_dir.mkdir(parents=True, exist_ok=True)
            folder = self._made_dirs[cand.dest_dir] = str(cand.dest_dir)
        tmp = f"{folder}/.{cand.url_sha1}.{random.getrandbits(32):08x}.part"
        resize = bool(self.config.resize_max_side)
        streamed = Streamed(ends=not resize, keep=not resize)
        try:
            # a raw descriptor: the chunks are large, so a buffered writer only adds work
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                lead = b""  # the first SNIFF_BYTES, however thinly the body arrives
                inflater = _Inflater.of(response)
                async for received in response.content.iter_any():  # as it arrives: no re-slicing
                    for chunk in (received,) if inflater is None else inflater.feed(received):
                        if len(lead) < SNIFF_BYTES:
                            lead += chunk[: SNIFF_BYTES - len(lead)]
                            if len(lead) == SNIFF_BYTES:
                                _refuse_unless_image(lead, response)
                        streamed.update(chunk)
                        if streamed.size > self.config.max_bytes:
                            raise _Failure("too_large", status, f"body passed max_bytes {self.config.max_bytes}")
                        view = memoryview(chunk)
                        while view:  # a regular file takes it in one write; the loop is for the rare short one
                            view = view[os.write(fd, view) :]
                if inflater is not None and not inflater.finished():
                    raise _Failure("not_image", status, f"{inflater.encoding} body ends before its end")
            finally:
                os.close(fd)
            if streamed.size == 0:
                raise _Failure("not_image", status, "empty body")
            if len(lead) < SNIFF_BYTES:
                _refuse_unless_image(lead, response)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return tmp, status, streamed
