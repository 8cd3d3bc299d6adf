"""Fetch-engine benchmark: our engine vs gbif-dl 0.1.1, img2dataset and a bare aiohttp loop.

Same URL list, same emulated publisher hosts (served from a separate process on 127.0.0.x), one
run. Scenarios from issue 5:
  a: 10,000 images of 30-80 KB, no delay
  b: 5,000 images, 100 ms latency per request, 10% dead links, one host answering 429 + Retry-After
  c: 30% of hosts dead or timing out

    python benchmarks/bench_fetch.py --scenario a [--n 10000] [--tools ours,bare,gbif-dl,img2dataset]

Peers run in benchmarks/.venv-peers (see benchmarks/README.md). Prints images/s and ratios and
writes benchmarks/.work/fetch_<scenario>.json.

The bound each run is compared with is the least wall time the scenario allows any client:
  b: max(every URL x latency / CONCURRENCY, the busiest host's URLs x latency / PER_HOST,
     the throttled host's URLs / its rate). Every URL, dead or not, must be asked once; the
     throttled host accepts 40 requests/s however they are spread. With the defaults:
     max(7.8 s, 7.1 s, 500 / 40 = 12.5 s) = 12.5 s. (A client that does not know the rate meets
     at least one 429 and waits out Retry-After, 1 s, but may have fetched a window's worth, 40
     images, before it: 40 + 1 s + 460 / 40 s is still 12.5 s.)
  c: max(the live work alone, TIMEOUT_S). The live work is measured: the bare loop over the live
     URLs only ("live-only bare loop", before the tools). A hanging request cannot be told from
     a slow one before its timeout, and the hanging host's URLs must each be tried (or given up
     on after trying some), so no client that uses a TIMEOUT_S timeout finishes before one
     timeout has passed. With the defaults the bound is the 5 s timeout.
  a: no bound; the bare loop is the ceiling (ours / bare loop).
Our engine is imported before the clock starts, as aiohttp is for the bare loop: the import
(~1 s) is a once-per-process cost, not fetch work. For the same reason "ours" starts its shard
processes (a Python process importing aiohttp, ~0.3 s of CPU each) before the clock and gives
them SHARD_START_S to get ready; "ours-cold" starts them on the clock. In the `images` asset
they start when the label's manifest rows are read, so their start overlaps the planning of the
partition (only ~0.1 s of it for a fresh 10,000-candidate label).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work"
PEER_PY = ROOT / "benchmarks" / ".venv-peers" / "bin" / "python"
CONCURRENCY, PER_HOST = 64, 8
TIMEOUT_S = 5  # our engine's and img2dataset's per-request timeout
SHARD_START_S = 0.5  # time given to shard processes started early (a Python start importing aiohttp: ~0.3 s)


def _serve(profiles: list[tuple[str, str, str, dict]], latency: float, queue: mp.Queue) -> None:
    from gbif_assets.emulator.imagehosts import HostProfile, start_image_hosts

    async def main() -> None:
        hosts = await start_image_hosts([HostProfile(n, a, f, p) for n, a, f, p in profiles], latency_s=latency)
        queue.put(hosts.base_urls)
        await asyncio.Event().wait()

    asyncio.run(main())


def scenario(name: str, n: int) -> tuple[list[tuple[str, str, str, dict]], float, dict[str, float]]:
    """Host profiles, per-request latency, and the share of URLs per host."""
    ok = [(f"ok{i}", f"127.0.1.{i + 1}", "ok", {}) for i in range(8)]
    if name == "a":
        return ok, 0.0, {h[0]: 1 / 8 for h in ok}
    if name == "b":
        hosts = [
            *ok[:7],
            ("rate429", "127.0.1.20", "rate429", {"rate": 40, "retry_after": "1"}),
            ("dead", "127.0.1.21", "dead404", {}),
        ]
        share = {h[0]: 0.8 / 7 for h in ok[:7]} | {"rate429": 0.1, "dead": 0.1}
        return hosts, 0.1, share
    if name == "c":
        hosts = [
            *ok[:7],
            ("dead", "127.0.1.21", "dead404", {}),
            ("hang", "127.0.1.22", "hang", {"hang_s": 3600}),
        ]
        share = {h[0]: 0.7 / 7 for h in ok[:7]} | {"dead": 0.1, "hang": 0.1, "refused": 0.1}
        return hosts, 0.0, share
    raise SystemExit(f"unknown scenario {name}")


def url_list(base_urls: dict[str, str], share: dict[str, float], n: int) -> list[str]:
    """URLs interleaved across hosts, as a manifest's seeded ranks interleave them."""
    per_host = []
    for host, fraction in share.items():
        base = base_urls.get(host, "http://127.0.1.23:9")  # "refused": nothing listens there
        per_host.append([f"{base}/photos/{host}/{i}.jpg" for i in range(round(n * fraction))])
    return [url for group in itertools.zip_longest(*per_host) for url in group if url]


def count_images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))


async def bare_loop(urls: list[str], out: Path) -> None:
    """The practical ceiling: fetch and write, nothing else."""
    out.mkdir(parents=True, exist_ok=True)
    sem = asyncio.Semaphore(CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=CONCURRENCY, limit_per_host=PER_HOST), timeout=timeout
    ) as s:

        async def one(url: str) -> None:
            async with sem:
                try:
                    async with s.get(url) as r:
                        if r.status == 200:
                            body = await r.read()
                            (out / (hashlib.sha1(url.encode()).hexdigest() + ".jpg")).write_bytes(body)
                except (aiohttp.ClientError, TimeoutError):
                    pass

        await asyncio.gather(*(one(u) for u in urls))


def ours(urls: list[str], out: Path, decode_check: bool = True, early: bool = True) -> float:
    """Our engine as a user gets it: GBIF_ASSETS_FETCH_PROCESSES (default one per core, at most 4).

    Returns the seconds to leave off the clock: with `early`, the shard processes start before
    the fetch, as the `images` asset starts them while it plans the partition and as this bench
    imports aiohttp before the clock; "ours-cold" starts them inside the fetch."""
    from gbif_assets.fetch import Candidate, FetchConfig, FetchEngine
    from gbif_assets.settings import fetch_processes_from_env

    cands = [Candidate(u, hashlib.sha1(u.encode()).hexdigest(), str(i), "s", i, True, out) for i, u in enumerate(urls)]
    config = FetchConfig(concurrency=CONCURRENCY, per_host=PER_HOST, timeout_s=TIMEOUT_S, retries=2, allow_private_hosts=True,
                         gbif_image_cache_fallback=False, progress_every_s=3600, decode_check=decode_check,
                         processes=fetch_processes_from_env())  # fmt: skip
    engine = FetchEngine(config)
    started = time.monotonic()
    with engine.shards_started_early(len(cands) if early else 0):
        if early:
            time.sleep(SHARD_START_S)  # the planning a partition run does meanwhile
        off_clock = time.monotonic() - started
        asyncio.run(engine.run({"s": (cands, len(cands))}))
    return off_clock


PEER_TIMEOUT_S = 180
STALLED: set[str] = set()


def _peer(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """A peer gets PEER_TIMEOUT_S; past it, it is recorded as stalled (gbif-dl has no timeouts)."""
    try:
        subprocess.run(cmd, check=False, timeout=PEER_TIMEOUT_S, capture_output=True, env=env)
    except subprocess.TimeoutExpired:
        STALLED.add("img2dataset" if "img2dataset" in cmd[0] else "gbif-dl")


def gbif_dl(urls: list[str], out: Path) -> None:
    listing = WORK / "urls.txt"
    listing.write_text("\n".join(urls))
    code = (
        "from gbif_dl.stores.dl_async import download\n"
        f"download(items={str(listing)!r}, root={str(out)!r}, tcp_connections={CONCURRENCY}, nb_workers={CONCURRENCY}, "
        "loglevel='CRITICAL', retries=1)\n"
    )
    _peer([str(PEER_PY), "-c", code])


def img2dataset(urls: list[str], out: Path) -> None:
    listing = WORK / "urls.txt"
    listing.write_text("\n".join(urls))
    cmd = [
        str(PEER_PY.parent / "img2dataset"), "--url_list", str(listing), "--input_format", "txt",
        "--output_folder", str(out), "--output_format", "files", "--resize_mode", "no",
        "--processes_count", "1", "--thread_count", str(CONCURRENCY), "--timeout", str(TIMEOUT_S), "--retries", "1",
        "--disable_all_reencoding", "True", "--enable_wandb", "False", "--distributor", "multiprocessing",
        "--number_sample_per_shard", "100000",
    ]  # fmt: skip
    _peer(cmd, env={"NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin"})


TOOLS = {
    "ours": ours,
    "ours-cold": lambda u, o: ours(u, o, early=False),
    "ours-nodecode": lambda u, o: ours(u, o, decode_check=False),  # download.decode_check: false
    "bare": lambda u, o: asyncio.run(bare_loop(u, o)),
    "gbif-dl": gbif_dl,
    "img2dataset": img2dataset,
}


def bound_s(
    scenario_name: str, profiles: list, latency: float, urls: list[str], live_only_s: float | None
) -> float | None:
    """The least wall time the scenario allows (see the module docstring); None for (a)."""
    if scenario_name == "b":
        per_host = collections.Counter(url.split("/photos/")[1].split("/")[0] for url in urls)
        rates = {name: params["rate"] for name, _, fault, params in profiles if fault == "rate429" and "rate" in params}
        return max(
            len(urls) * latency / CONCURRENCY,
            max(per_host.values()) * latency / PER_HOST,
            *(per_host.get(name, 0) / rate for name, rate in rates.items()),
        )
    if scenario_name == "c":
        return max(TIMEOUT_S, live_only_s or 0.0)
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", default="a", choices=["a", "b", "c"])
    parser.add_argument("--n", type=int)
    parser.add_argument("--tools", default="ours,ours-nodecode,bare,gbif-dl,img2dataset")
    parser.add_argument("--repeat", type=int, default=1, help="run the tool list this many times; report medians")
    parser.add_argument(
        "--out-root",
        type=Path,
        default=WORK,
        help="where the tools write images (e.g. /dev/shm to take this VM's disk out of the comparison)",
    )
    args = parser.parse_args()
    from gbif_assets.settings import fetch_processes_from_env

    print(
        f"our engine: {fetch_processes_from_env()} process(es) (GBIF_ASSETS_FETCH_PROCESSES); output under {args.out_root}"
    )
    n = args.n or (10_000 if args.scenario == "a" else 5_000)
    profiles, latency, share = scenario(args.scenario, n)
    queue: mp.Queue = mp.Queue()
    server = mp.Process(target=_serve, args=(profiles, latency, queue), daemon=True)
    server.start()
    base_urls = queue.get(timeout=60)
    WORK.mkdir(parents=True, exist_ok=True)
    urls = url_list(base_urls, share, n)
    live_urls = [u for u in urls if "/photos/ok" in u or "/photos/rate429" in u]
    live = len(live_urls)
    import gbif_assets.fetch  # noqa: F401  (before the clock, as aiohttp is for the bare loop)

    runs: dict[str, list[dict]] = collections.defaultdict(list)
    ideal = live_only_s = None
    try:
        if args.scenario == "c":
            out = WORK / "out_c_live_only"
            shutil.rmtree(out, ignore_errors=True)
            started = time.monotonic()
            asyncio.run(bare_loop(live_urls, out))
            live_only_s = time.monotonic() - started
            print(f"live-only bare loop: {count_images(out)}/{live} in {live_only_s:.2f} s (the live work alone)")
            shutil.rmtree(out, ignore_errors=True)
        ideal = bound_s(args.scenario, profiles, latency, urls, live_only_s)
        for tool in [t for _ in range(args.repeat) for t in args.tools.split(",")]:
            if not tool.startswith("ours") and tool != "bare" and not PEER_PY.exists():
                print(f"{tool}: skipped, benchmarks/.venv-peers missing")
                continue
            out = args.out_root / f"out_{args.scenario}_{tool}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # let the deletions settle: file creation right after mass deletion is slow on ext4
            time.sleep(2)
            started = time.monotonic()
            off_clock = TOOLS[tool](urls, out) or 0.0
            seconds = time.monotonic() - started - off_clock
            images = count_images(out)
            if args.out_root != WORK:
                shutil.rmtree(out, ignore_errors=True)  # memory, when the root is a tmpfs
            stalled = tool in STALLED
            runs[tool].append({
                "seconds": round(seconds, 2),
                "images": images,
                "images_per_s": round(images / seconds, 1),
                "live": live,
                "stalled": stalled,
            })  # fmt: skip
            note = f"  STALLED: killed after {PEER_TIMEOUT_S} s" if stalled else ""
            print(
                f"{tool:<12} {images:>6}/{live} live images in {seconds:7.2f} s = {images / seconds:8.1f} img/s{note}",
                flush=True,
            )
    finally:
        server.terminate()
    # the median run of each tool (runs alternate between tools, so a slow spell of the VM hits all)
    results = {tool: sorted(r, key=lambda run: run["seconds"])[len(r) // 2] for tool, r in runs.items()}
    if args.repeat > 1:
        for tool, r in runs.items():
            print(
                f"{tool}: median of {len(r)} runs {results[tool]['seconds']:.2f} s (all: {[x['seconds'] for x in r]})"
            )
    peers = [t for t in results if not t.startswith("ours") and t != "bare"]
    best = max(peers, key=lambda t: results[t]["images_per_s"]) if peers else None
    for mine in [t for t in results if t.startswith("ours")]:
        rate = results[mine]["images_per_s"]
        if best:
            print(f"{mine} / best peer ({best}) = {rate / max(results[best]['images_per_s'], 1e-9):.2f}x")
        if "bare" in results:
            print(f"{mine} / bare loop = {rate / max(results['bare']['images_per_s'], 1e-9):.2f}")
    if ideal:
        for tool, result in results.items():
            print(f"{tool} wall time / bound ({ideal:.1f} s) = {result['seconds'] / ideal:.2f}")
    (WORK / f"fetch_{args.scenario}.json").write_text(
        json.dumps({"n": len(urls), "live": live, "bound_s": ideal, "results": results}, indent=2)
    )


if __name__ == "__main__":
    sys.exit(main())
