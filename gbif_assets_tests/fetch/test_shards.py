"""Fetching with shard processes: the same quota, limits and fallbacks, on more than one core."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from gbif_assets.emulator.imagehosts import ImageHosts
from gbif_assets.fetch import Candidate, FetchConfig, FetchEngine
from gbif_assets.settings import fetch_processes_from_env


def _cand(url: str, dest: Path, stream: str = "s", rank: int = 1, gbif_id: str = "1") -> Candidate:
    return Candidate(url, hashlib.sha1(url.encode()).hexdigest(), gbif_id, stream, rank, True, dest)


def _config(**kw) -> FetchConfig:
    base = dict(allow_private_hosts=True, retries=2, timeout_s=2, backoff_base_s=0.05, gbif_image_cache_fallback=False,
                processes=2, shard_min_candidates=0)  # fmt: skip
    return FetchConfig(**{**base, **kw})


def _run(config: FetchConfig, streams: dict[str, tuple[list[Candidate], int]]) -> FetchEngine:
    engine = FetchEngine(config)
    asyncio.run(engine.run(streams))
    return engine


def _shard_pids() -> list[int]:
    """Shard processes started by this test process."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"gbif_assets.fetch.shard" in cmdline and ppid == os.getpid():
            pids.append(int(entry.name))
    return pids


def _shards_shown(count: int) -> list[int]:
    """The shard processes, once `count` show in /proc (a loaded machine may list one late)."""
    deadline = time.monotonic() + 5
    while len(pids := _shard_pids()) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return pids


def test_hosts_are_split_between_processes_and_limits_hold(hosts: ImageHosts, tmp_path: Path) -> None:
    names = ["ok", "slow", "redirect", "rate429"]
    for name in names:
        hosts.stats[name].max_open_connections = hosts.stats[name].open_connections
    cands = [
        _cand(f"{hosts.base_urls[name]}/shards/{name}/{i}.jpg", tmp_path, rank=4 * i + n)
        for i in range(12)
        for n, name in enumerate(names)
    ]
    engine = _run(_config(per_host=3, concurrency=16), {"s": (cands, len(cands))})
    assert sum(o.ok for o in engine.outcomes) == len(cands) == 48
    report = engine.host_report()
    assert {r["shard"] for r in report.values()} == {0, 1}  # both processes fetched
    assert {hosts.stats[name].max_open_connections for name in names} <= {1, 2, 3}  # per_host held
    ok_rows = [a for a in engine.attempts if a["error"] is None]
    assert len(ok_rows) == 48 and {a["host"] for a in engine.attempts} == {h for h in report}
    for outcome in engine.outcomes:  # the stored file is the verified file
        assert outcome.path is not None and outcome.verified is not None
        assert hashlib.sha256(outcome.path.read_bytes()).hexdigest() == outcome.verified.sha256
        with Image.open(outcome.path) as img:
            img.verify()
    assert not list(tmp_path.glob(".*.part"))


def test_dead_links_are_replaced_and_rescued_across_processes(hosts: ImageHosts, tmp_path: Path) -> None:
    """The dead host and the cache host sit in different processes; quota and fallback still hold."""
    cache = f"{hosts.base_urls['ok']}/v1/image/cache"
    dead = [_cand(f"{hosts.base_urls['dead404']}/x/{i}.jpg", tmp_path, "a", rank=i, gbif_id=str(i)) for i in range(4)]
    live = [_cand(f"{hosts.base_urls['ok']}/x/{i}.jpg", tmp_path, "a", rank=i) for i in range(4, 12)]
    other = [_cand(f"{hosts.base_urls['dead404']}/y/{i}.jpg", tmp_path, "b", rank=i) for i in range(5)]
    engine = _run(
        _config(gbif_image_cache_fallback=True, image_cache_base=cache),
        {"a": (dead + live, 6), "b": (other, 2)},
    )
    kept = [o for o in engine.outcomes if o.ok]
    assert sorted(o.candidate.stream for o in kept) == ["a"] * 6 + ["b"] * 2
    assert {o.source for o in kept if o.candidate.stream == "b"} == {"gbif_cache"}
    assert {r["shard"] for r in engine.host_report().values()} == {0, 1}
    # no stream fetched more than it needed: a's first four were rescued from the cache
    assert sorted(o.candidate.rank for o in kept if o.candidate.stream == "a") == [0, 1, 2, 3, 4, 5]


def test_a_shard_process_that_dies_fails_the_run_and_leaves_no_partial_file(hosts: ImageHosts, tmp_path: Path) -> None:
    cands = [
        _cand(f"{hosts.base_urls[name]}/die/{name}/{i}.jpg", tmp_path, rank=2 * i + n)
        for i in range(60)
        for n, name in enumerate(["slow", "ok"])
    ]
    killed: list[int] = []

    def kill_a_shard() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not killed:
            for pid in _shard_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_shard)
    killer.start()
    with pytest.raises(RuntimeError, match=r"fetch shard process \d+ exited \(code -9\) before finishing"):
        _run(_config(per_host=2, concurrency=4), {"s": (cands, len(cands))})
    killer.join()
    assert killed
    for path in tmp_path.iterdir():  # every file at a final path is a whole, verified image
        if not path.name.startswith("."):
            with Image.open(path) as img:
                img.verify()
    assert _shard_pids() == []


def test_small_jobs_stay_in_this_process(hosts: ImageHosts, tmp_path: Path) -> None:
    cands = [
        _cand(f"{hosts.base_urls[name]}/small/{name}.jpg", tmp_path, rank=n) for n, name in enumerate(["ok", "slow"])
    ]
    engine = _run(_config(shard_min_candidates=1000), {"s": (cands, 2)})
    assert sum(o.ok for o in engine.outcomes) == 2
    assert {r["shard"] for r in engine.host_report().values()} == {0}


@pytest.mark.parametrize("raw", ["0", "-1", "two", "1.5"])
def test_a_bad_process_count_names_the_setting(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("GBIF_ASSETS_FETCH_PROCESSES", raw)
    with pytest.raises(ValueError, match="GBIF_ASSETS_FETCH_PROCESSES must be a whole number"):
        fetch_processes_from_env()


def test_the_process_count_defaults_to_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GBIF_ASSETS_FETCH_PROCESSES", raising=False)
    assert fetch_processes_from_env() == max(1, min(os.cpu_count() or 1, 4))
    monkeypatch.setenv("GBIF_ASSETS_FETCH_PROCESSES", "3")
    assert fetch_processes_from_env() == 3


def test_an_empty_job_with_processes_on_finishes_at_once(tmp_path: Path) -> None:
    engine = _run(_config(), {"s": ([], 5), "t": ([], 0)})
    assert engine.outcomes == [] and engine.host_report() == {}


def _zombie_children() -> list[int]:
    """Exited children of this test process that nobody reaped."""
    zombies = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state == "Z" and int(ppid) == os.getpid():
            zombies.append(int(entry.name))
    return zombies


def test_shards_started_early_do_the_fetching(hosts: ImageHosts, tmp_path: Path) -> None:
    """The shard process started before `run` (while a partition is planned) is the one that
    fetches: no second process starts, and none is left after."""
    cands = [
        _cand(f"{hosts.base_urls[name]}/early/{name}/{i}.jpg", tmp_path, rank=2 * i + n)
        for i in range(20)
        for n, name in enumerate(["ok", "slow"])
    ]
    engine = FetchEngine(_config())
    seen: set[int] = set()
    with engine.shards_started_early(len(cands)):
        early = set(_shards_shown(1))
        assert len(early) == 1
        running = threading.Event()

        def watch() -> None:
            while not running.is_set():
                seen.update(_shard_pids())
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            asyncio.run(engine.run({"s": (cands, len(cands))}))
        finally:
            running.set()
            watcher.join()
    assert seen == early
    assert sum(o.ok for o in engine.outcomes) == 40
    assert {r["shard"] for r in engine.host_report().values()} == {0, 1}
    assert _shard_pids() == [] and _zombie_children() == []


def test_shards_started_early_and_not_needed_are_stopped(hosts: ImageHosts, tmp_path: Path) -> None:
    """Planning that fails, or a job that needs no second process, leaves no process behind."""
    engine = FetchEngine(_config(shard_min_candidates=50))
    with pytest.raises(ValueError, match="planning failed"), engine.shards_started_early(100):
        assert len(_shards_shown(1)) == 1
        raise ValueError("planning failed")
    assert _shard_pids() == [] and _zombie_children() == []
    one_host = [_cand(f"{hosts.base_urls['ok']}/early-one/{i}.jpg", tmp_path, rank=i) for i in range(3)]
    with engine.shards_started_early(100):
        asyncio.run(engine.run({"s": (one_host, 3)}))
    assert sum(o.ok for o in engine.outcomes) == 3
    assert {r["shard"] for r in engine.host_report().values()} == {0}
    assert _shard_pids() == [] and _zombie_children() == []
    with engine.shards_started_early(10):  # below shard_min_candidates: none started
        assert _shard_pids() == []


def test_a_shard_started_early_that_died_is_replaced(hosts: ImageHosts, tmp_path: Path) -> None:
    """The process started early dies before the fetch (killed, or out of memory): the run
    starts another instead of failing the label."""
    cands = [
        _cand(f"{hosts.base_urls[name]}/early-dead/{name}/{i}.jpg", tmp_path, rank=2 * i + n)
        for i in range(10)
        for n, name in enumerate(["ok", "slow"])
    ]
    engine = FetchEngine(_config())
    with engine.shards_started_early(len(cands)):
        (early,) = _shards_shown(1)
        os.kill(early, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while early in _shard_pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        asyncio.run(engine.run({"s": (cands, len(cands))}))
    assert sum(o.ok for o in engine.outcomes) == 20
    assert {r["shard"] for r in engine.host_report().values()} == {0, 1}
    assert _shard_pids() == [] and _zombie_children() == []


def test_a_build_killed_while_planning_leaves_no_early_shard(tmp_path: Path) -> None:
    """kill -9 of the process planning a partition: the shard it started early dies with it."""
    code = (
        "import time\n"
        "from gbif_assets.fetch import FetchConfig, FetchEngine\n"
        "engine = FetchEngine(FetchConfig(processes=2, shard_min_candidates=0))\n"
        "with engine.shards_started_early(1):\n"
        "    print('planning', flush=True)\n"
        "    time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert parent.stdout is not None and parent.stdout.readline() == b"planning\n"

    def shards() -> list[Path]:
        return [p for p in Path("/proc").glob("[0-9]*") if _cmdline(p).endswith(f"--parent {parent.pid}")]

    assert len(shards()) == 1
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while shards() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shards() == []


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
