"""A refresh against a changed GBIF: only new media are fetched, splits never move, vanished
records are reported and kept (or removed) as the recipe says."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gbif_assets.build import BuildOptions, run_build
from gbif_assets.recipe import load_recipe
from gbif_assets_tests.conftest import copy_recipe


@pytest.mark.parametrize("policy", ["keep", "remove"])
def test_refresh_is_incremental_and_stable(gbif_env: Path, emulator, policy: str) -> None:
    path = copy_recipe("invasive_plants", gbif_env / "datasets", name=f"refresh_{policy}")
    path.write_text(path.read_text() + f"refresh_vanished: {policy}\n")
    recipe = load_recipe(path)
    home = gbif_env / "data" / recipe.name
    assert run_build(recipe, BuildOptions()) == 0
    first = {r["path"]: r for r in pq.read_table(home / "metadata" / "images.parquet").to_pylist()}
    mtimes = {p: (home / p).stat().st_mtime_ns for p in first}

    # GBIF changes: a few kept occurrences disappear, new ones with images arrive
    leaving = sorted({r["gbifID"] for r in first.values() if r["label"] == "5352251"})[:3]
    removed = [copy.deepcopy(emulator.pool.get(g)) for g in leaving]
    template = next(r for r in emulator.pool.records() if r.get("speciesKey") == 5352251 and r.get("media"))
    ok_base = emulator.image_hosts.base_urls["ok"]
    added = []
    for i in range(6):
        record = copy.deepcopy(template)
        record["key"] = 9_900_000_000 + i
        record["gbifID"] = str(record["key"])
        record["media"] = [
            {**template["media"][0], "identifier": f"{ok_base}/refresh/{policy}/{i}.jpg", "license": "CC0_1_0"}
        ]
        record["media"][0].pop("original_identifier", None)
        added.append(record)
    emulator.pool.remove(leaving)
    emulator.pool.add(added)
    second_started = dt.datetime.now(dt.UTC)
    try:
        assert run_build(recipe, BuildOptions()) == 0
    finally:
        emulator.pool.remove([r["gbifID"] for r in added])
        emulator.pool.add(removed)

    second = {r["path"]: r for r in pq.read_table(home / "metadata" / "images.parquet").to_pylist()}
    vanished_paths = [p for p, r in first.items() if r["gbifID"] in leaving]
    assert vanished_paths
    for path_, row in first.items():
        if path_ in second:
            assert second[path_]["split"] == row["split"]  # split assignments never change
            assert (home / path_).stat().st_mtime_ns == mtimes[path_]  # not fetched again
    for path_ in vanished_paths:
        assert (path_ in second) == (policy == "keep")
        assert (home / path_).exists() == (policy == "keep")
    log = pq.read_table(home / "metadata" / "downloads" / "5352251.parquet").to_pylist()
    refetched = [a for a in log if a["fetched_at"] >= second_started and a["url"] in {r["url"] for r in first.values()}]
    assert refetched == []  # the refresh downloaded nothing it already had
    new_urls = {r["media"][0]["identifier"] for r in added}
    fetched = {a["url"] for a in log if a["fetched_at"] >= second_started}
    # besides new records, only slots that leaving records vacated are refilled, from the stream's
    # reserve in rank order (whether new URLs rank high enough to take them depends on their hash)
    assert len(fetched - new_urls) <= len(leaving)


def test_a_recipe_narrowed_between_builds(gbif_env: Path) -> None:
    """The user drops a taxon and a licence from the recipe and builds again (default `keep`): the
    dropped class leaves (files, partition, metadata), refused licences leave, the blocking checks
    pass, and a backfill of all partitions no longer meets the dropped label."""
    import dagster as dg

    path = copy_recipe("invasive_plants", gbif_env / "datasets", name="narrowed")
    assert run_build(load_recipe(path), BuildOptions()) == 0
    home = gbif_env / "data" / "narrowed"
    first = pq.read_table(home / "metadata" / "images.parquet").to_pylist()
    assert {r["label"] for r in first} == {"5352251", "3190653", "3189866"}
    assert "CC-BY-NC-4.0" in {r["license"] for r in first}
    text = path.read_text().replace("speciesKey: [5352251, 3190653, 3189866]", "speciesKey: [5352251, 3190653]")
    path.write_text(text.replace("licenses: [CC0-1.0, CC-BY-4.0, CC-BY-NC-4.0, CC-BY-SA-4.0]",
                                 "licenses: [CC0-1.0, CC-BY-4.0, CC-BY-SA-4.0]"))  # fmt: skip
    assert run_build(load_recipe(path), BuildOptions()) == 0
    second = pq.read_table(home / "metadata" / "images.parquet").to_pylist()
    assert {r["label"] for r in second} == {"5352251", "3190653"}
    assert "CC-BY-NC-4.0" not in {r["license"] for r in second}
    assert not list(home.glob("images/*/3189866"))
    on_disk = {p.relative_to(home).as_posix() for p in home.glob("images/*/*/*.*") if p.name != "metadata.jsonl"}
    assert on_disk == {r["path"] for r in second}
    instance = dg.DagsterInstance.local_temp(tempdir=str(gbif_env / "data" / ".dagster"))
    assert set(instance.get_dynamic_partitions("narrowed_labels")) == {"5352251", "3190653"}


def _attempts(home: Path) -> list[dict]:
    return [
        r for log in sorted((home / "metadata" / "downloads").glob("*.parquet")) for r in pq.read_table(log).to_pylist()
    ]


def test_a_new_seed_and_split_refresh_as_a_fresh_build_would(gbif_env: Path) -> None:
    """A new seed selects other candidates: they are fetched, and the images the selection no
    longer needs leave (they used to fill the quota first, so newly selected ones were never
    tried). Images whose occurrence moved to another split are moved, not fetched again. A kept
    file changed in place at the same size is fetched again, not re-hashed and kept."""
    import hashlib

    path = copy_recipe("invasive_plants", gbif_env / "datasets", name="reseeded")
    assert run_build(load_recipe(path), BuildOptions()) == 0
    home = gbif_env / "data" / "reseeded"
    first = {r["url"]: r for r in pq.read_table(home / "metadata" / "images.parquet").to_pylist()}
    text = path.read_text()
    assert "seed: 0" in text and "split: {train: 0.8, val: 0.1, test: 0.1}" in text
    path.write_text(text.replace("seed: 0", "seed: 7").replace(
        "split: {train: 0.8, val: 0.1, test: 0.1}", "split: {train: 0.6, val: 0.2, test: 0.2}"))  # fmt: skip
    second_started = dt.datetime.now(dt.UTC)
    assert run_build(load_recipe(path), BuildOptions()) == 0
    second = {r["url"]: r for r in pq.read_table(home / "metadata" / "images.parquet").to_pylist()}
    manifest = pq.read_table(home / "metadata" / "manifest.parquet").to_pylist()
    attempts = _attempts(home)
    tried = {a["url"] for a in attempts}
    failed = {a["url"] for a in attempts if a["error"]} - {a["url"] for a in attempts if a["error"] is None}
    selected = [m for m in manifest if m["selected"]]
    assert not [m["identifier"] for m in selected if m["identifier"] not in second and m["identifier"] not in tried]
    for stream in {m["stream"] for m in manifest}:
        chosen = [m for m in selected if m["stream"] == stream]
        extra = [u for u, r in second.items() if r["stream"] == stream and r["rank"] > max(m["rank"] for m in chosen)]
        assert len(extra) <= sum(m["identifier"] in failed for m in chosen), stream  # reserves only for failures
    moved = [u for u in first.keys() & second.keys() if first[u]["split"] != second[u]["split"]]
    assert moved  # the new fractions moved some occurrences
    again = {a["url"] for a in attempts if a["error"] is None and a["fetched_at"] >= second_started}
    assert not again & first.keys()  # kept, moved or not: nothing fetched twice
    for url in moved:
        assert (home / second[url]["path"]).is_file() and not (home / first[url]["path"]).exists()

    victim = sorted(second)[0]
    file = home / second[victim]["path"]
    data = bytearray(file.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 100] = bytes(100)  # still decodes: only scan data changed
    file.write_bytes(bytes(data))
    third_started = dt.datetime.now(dt.UTC)
    assert run_build(load_recipe(path), BuildOptions()) == 0
    assert hashlib.sha256(file.read_bytes()).hexdigest() == second[victim]["sha256"]
    assert any(a["url"] == victim and a["error"] is None and a["fetched_at"] >= third_started for a in _attempts(home))
