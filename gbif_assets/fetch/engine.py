"""The image fetch engine: one event loop, global and per-host limits, retries, quota.

Peers fail in known ways: gbif-dl stalls on a connection error and has no timeouts, gbifxdl
cannot resume, img2dataset has no per-host limit and no backoff, gbif-image-downloader is
sequential. This engine streams bodies to temporary files, verifies them in a worker process,
renames only verified files into place, replaces dead links from the same stream's reserve,
tries GBIF's image cache before giving up, and logs every attempt.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import hashlib
import itertools
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from gbif_assets.fetch.safety import (
    ALLOWED_SCHEMES,
    BlockedAddress,
    GuardedResolver,
    host_literal_allowed,
    sniff,
)
from gbif_assets.fetch.verify import Verified, die_with_parent, verify_image
from gbif_assets.gbif.client import retry_after_seconds

log = logging.getLogger(__name__)
MAX_REDIRECTS = 5
RATE_LIMIT_EXTRA_TRIES = 6  # a 429 is the host asking for patience, not a broken link
RETRYABLE = {"timeout", "reset", "truncated", "http_429", "http_5xx", "connect"}
BREAKER_ERRORS = {"timeout", "connect", "reset", "dns"}
USER_AGENT = "gbif-assets/0.1 (training-set builder; polite: per-host limits, backoff)"


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
    verify_workers: int = 2
    verify_processes: bool = True
    decode_check: bool = True


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
    path: Path | None = None
    verified: Verified | None = None
    source: str | None = None
    error: str | None = None
    fetched_at: dt.datetime | None = None


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


class _Breaker:
    """Per-host circuit breaker: after N consecutive connection-level failures, skip the host."""

    def __init__(self, failures: int, open_s: float) -> None:
        self.failures, self.open_s = failures, open_s
        self.count: dict[str, int] = collections.defaultdict(int)
        self.open_until: dict[str, float] = {}

    def is_open(self, host: str) -> bool:
        until = self.open_until.get(host)
        if until is None:
            return False
        if time.monotonic() >= until:  # half-open: let one request probe the host
            del self.open_until[host]
            self.count[host] = self.failures - 1
            return False
        return True

    def record(self, host: str, error: str | None) -> None:
        if error in BREAKER_ERRORS:
            self.count[host] += 1
            if self.count[host] >= self.failures:
                self.open_until[host] = time.monotonic() + self.open_s
        elif error is None or not error.startswith("http_5"):
            self.count[host] = 0


class FetchEngine:
    """Fetch candidates stream by stream until each stream's target is met."""

    def __init__(self, config: FetchConfig, progress: Callable[[Progress], None] | None = None) -> None:
        self.config = config
        self.progress_cb = progress
        self.attempts: list[dict[str, Any]] = []
        self.outcomes: list[Outcome] = []
        self.failures: collections.Counter[str] = collections.Counter()
        self._breaker = _Breaker(config.breaker_failures, config.breaker_open_s)
        self._hosts: dict[str, asyncio.Semaphore] = {}
        self._global = asyncio.Semaphore(config.concurrency)
        self._pool: Executor | None = None
        self._made_dirs: set[Path] = set()
        self._paused_until: dict[str, float] = {}
        self._done = 0
        self._target = 0
        self._started = time.monotonic()

    def _host_sem(self, host: str) -> asyncio.Semaphore:
        if host not in self._hosts:
            self._hosts[host] = asyncio.Semaphore(self.config.per_host)
        return self._hosts[host]

    def _log(self, cand: Candidate, url: str, final_url: str | None, status: int | None, error: str | None,
             size: int, started: float, attempt: int, source: str, detail: str | None = None) -> None:  # fmt: skip
        self.attempts.append(
            {
                "url": cand.url,
                "host": (urlsplit(url).hostname or "").lower(),
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
        """Fetch every stream to its target; returns the outcome of every tried candidate."""
        self._target = sum(target for _, target in streams.values())
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
        self._pool = self._executor()
        reporter = asyncio.create_task(self._report_loop())
        try:
            async with aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                headers={"User-Agent": self.config.user_agent},
                auto_decompress=False,
            ) as session:
                await asyncio.gather(*(self._run_stream(session, c, t) for c, t in streams.values()))
        finally:
            reporter.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._emit()
        return self.outcomes

    def _executor(self) -> Executor:
        """Image checks off the event loop: a worker process uses the second core (measured
        faster than threads, which fight the loop for the GIL); threads when processes are off."""
        if self.config.verify_processes:
            return ProcessPoolExecutor(max_workers=self.config.verify_workers, initializer=die_with_parent)
        return ThreadPoolExecutor(max_workers=self.config.verify_workers, thread_name_prefix="verify")

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.progress_every_s)
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

    async def _run_stream(self, session: aiohttp.ClientSession, candidates: list[Candidate], target: int) -> None:
        """Workers pull candidates in rank order; a failure frees its place for the next reserve.

        A worker only starts a candidate while `done + in_flight < target`, so the stream never
        fetches more than it needs, and waits while others are in flight (they may fail).
        """
        queue = collections.deque(sorted(candidates, key=lambda c: c.rank))
        state = {"done": 0, "in_flight": 0}
        changed = asyncio.Condition()

        async def worker() -> None:
            while True:
                async with changed:
                    while queue and state["done"] + state["in_flight"] >= target and state["done"] < target:
                        await changed.wait()
                    if not queue or state["done"] >= target:
                        return
                    cand = queue.popleft()
                    state["in_flight"] += 1
                outcome = await self._fetch(session, cand)
                self.outcomes.append(outcome)
                async with changed:
                    state["in_flight"] -= 1
                    if outcome.ok:
                        state["done"] += 1
                        self._done += 1
                    else:
                        self.failures[outcome.error or "error"] += 1
                    changed.notify_all()

        if target > 0:
            await asyncio.gather(*(worker() for _ in range(min(target, self.config.concurrency, len(queue)))))

    async def _fetch(self, session: aiohttp.ClientSession, cand: Candidate) -> Outcome:
        host = (urlsplit(cand.url).hostname or "").lower()
        outcome = await self._fetch_with_retries(session, cand, cand.url, host, "publisher")
        if not outcome.ok and self.config.gbif_image_cache_fallback and self.config.image_cache_base:
            md5 = hashlib.md5(cand.url.encode("utf-8")).hexdigest()
            cache_url = f"{self.config.image_cache_base.rstrip('/')}/occurrence/{cand.gbif_id}/media/{md5}"
            cache_host = (urlsplit(cache_url).hostname or "").lower()
            rescued = await self._fetch_with_retries(session, cand, cache_url, cache_host, "gbif_cache")
            if rescued.ok:
                return rescued
        return outcome

    async def _wait_for_host(self, host: str) -> None:
        """A 429 with Retry-After pauses the whole host, not just the request that got it."""
        while (pause := self._paused_until.get(host, 0.0) - time.monotonic()) > 0:
            await asyncio.sleep(pause)

    async def _fetch_with_retries(
        self, session: aiohttp.ClientSession, cand: Candidate, url: str, host: str, source: str
    ) -> Outcome:
        last: _Failure | None = None
        failures = throttled = 0
        for attempt in itertools.count(1):
            await self._wait_for_host(host)
            if self._breaker.is_open(host):
                self._log(cand, url, None, None, "circuit_open", 0, time.monotonic(), attempt, source)
                return Outcome(cand, False, error=last.error if last else "circuit_open", source=source)
            started = time.monotonic()
            try:
                path, verified, final_url, status = await self._attempt(session, cand, url)
            except _Failure as failure:
                last = failure
                self._breaker.record(host, failure.error)
                self._log(
                    cand,
                    url,
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
                if failure.error not in RETRYABLE or give_up:
                    break
                delay = failure.retry_after
                if failure.error == "http_429" and delay is not None:
                    self._paused_until[host] = max(self._paused_until.get(host, 0.0), time.monotonic() + delay)
                    continue
                if delay is None:
                    delay = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
                    delay *= 0.5 + random.random() / 2
                await asyncio.sleep(min(delay, self.config.backoff_max_s))
                continue
            self._breaker.record(host, None)
            self._log(cand, url, final_url, status, None, verified.size, started, attempt, source)
            return Outcome(
                cand,
                True,
                path=path,
                verified=verified,
                source=source,
                fetched_at=dt.datetime.now(dt.UTC),
            )
        assert last is not None
        return Outcome(cand, False, error=last.error, source=source)

    async def _attempt(
        self, session: aiohttp.ClientSession, cand: Candidate, url: str
    ) -> tuple[Path, Verified, str, int]:
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            scheme = urlsplit(current).scheme.lower()
            if scheme not in ALLOWED_SCHEMES:
                raise _Failure("blocked", detail=f"scheme {scheme or '(none)'} is not http(s): {current[:200]}")
            host = (urlsplit(current).hostname or "").lower()
            if not host_literal_allowed(host, self.config.allow_private_hosts):
                raise _Failure(
                    "blocked",
                    detail=f"{host} is a loopback, private, link-local or multicast address",
                )
            async with self._host_sem(host), self._global:  # host first: a busy host never holds global slots
                if self._breaker.is_open(host):  # opened while this request waited for a slot
                    raise _Failure("circuit_open", detail=f"{host} failed repeatedly; skipped for now")
                try:
                    async with session.get(current, allow_redirects=False) as response:
                        if response.status in (301, 302, 303, 307, 308):
                            location = response.headers.get("Location")
                            if not location:
                                raise _Failure("http_3xx", response.status, "redirect without Location")
                            current = urljoin(current, location)
                            continue
                        tmp, status = await self._download(response, cand)
                        break
                except _Failure:
                    raise
                except BlockedAddress as exc:
                    raise _Failure("blocked", detail=str(exc)) from None
                except aiohttp.ClientConnectorError as exc:
                    if isinstance(exc.os_error, BlockedAddress):
                        raise _Failure("blocked", detail=str(exc.os_error)) from None
                    kind = "dns" if isinstance(exc, aiohttp.ClientConnectorDNSError) else "connect"
                    raise _Failure(kind, detail=str(exc)[:300]) from None
                except (TimeoutError, aiohttp.ServerTimeoutError):
                    raise _Failure("timeout", detail=f"no answer within {self.config.timeout_s:g} s") from None
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
        else:
            raise _Failure("too_many_redirects", detail=f"more than {MAX_REDIRECTS} redirects from {url[:200]}")
        try:  # verification runs after the connection slot is released
            loop = asyncio.get_running_loop()
            verified = await loop.run_in_executor(
                self._pool,
                verify_image,
                str(tmp),
                self.config.max_pixels,
                self.config.resize_max_side,
                self.config.decode_check,
            )
            if not verified.ok:
                raise _Failure(verified.error or "decode_error", status, verified.detail)
            final = cand.dest_dir / f"{cand.url_sha1}.{verified.ext}"
            tmp.replace(final)
            return final, verified, current, status
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    async def _download(self, response: aiohttp.ClientResponse, cand: Candidate) -> tuple[Path, int]:
        """Stream a 200 body to a temporary file next to its final place, within max_bytes."""
        status = response.status
        if status == 429:
            raise _Failure(
                "http_429",
                status,
                retry_after=retry_after_seconds(response.headers.get("Retry-After"), None),
            )  # type: ignore[arg-type]
        if status >= 500:
            raise _Failure(
                "http_5xx",
                status,
                retry_after=retry_after_seconds(response.headers.get("Retry-After"), None),
            )  # type: ignore[arg-type]
        if status != 200:
            raise _Failure(f"http_{status}", status)
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.config.max_bytes:
            raise _Failure("too_large", status, f"Content-Length {length} > max_bytes {self.config.max_bytes}")
        if cand.dest_dir not in self._made_dirs:
            cand.dest_dir.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(cand.dest_dir)
        tmp = cand.dest_dir / f".{cand.url_sha1}.{random.getrandbits(32):08x}.part"
        size = 0
        try:
            with tmp.open("wb") as handle:
                first = True
                async for chunk in response.content.iter_chunked(1 << 16):
                    if first:
                        if sniff(chunk[:16]) is None:
                            kind = "html" if chunk.lstrip()[:1] == b"<" else "unknown"
                            raise _Failure(
                                "not_image",
                                status,
                                f"body is {kind}, not an image (Content-Type {response.headers.get('Content-Type')})",
                            )
                        first = False
                    size += len(chunk)
                    if size > self.config.max_bytes:
                        raise _Failure("too_large", status, f"body passed max_bytes {self.config.max_bytes}")
                    handle.write(chunk)
            if size == 0:
                raise _Failure("not_image", status, "empty body")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, status
