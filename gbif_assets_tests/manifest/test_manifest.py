"""The manifest: licences, filter funnel, gbif-dl balancing, reserve ranks, grouped stable splits."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gbif_assets.ingest import load_search_records, required_fields
from gbif_assets.manifest import (
    build_manifest,
    check_split_leakage,
    normalize_license,
    stream_targets,
)
from gbif_assets.manifest.build import _md5_mod
from gbif_assets.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[2]
RECORDED = ROOT / "gbif_assets" / "emulator" / "data" / "recorded"


def _recipe(**changes) -> object:
    data = yaml.safe_load((ROOT / "datasets" / "invasive_plants.yaml").read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return parse_recipe(data, "test")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://creativecommons.org/licenses/by-nc/4.0/", "CC-BY-NC-4.0"),
        ("http://creativecommons.org/licenses/by/4.0/", "CC-BY-4.0"),
        ("http://creativecommons.org/publicdomain/zero/1.0/", "CC0-1.0"),
        ("http://creativecommons.org/licenses/by-nc-sa/4.0/", "CC-BY-NC-SA-4.0"),
        ("http://creativecommons.org/licenses/by-nc/3.0/", "CC-BY-NC-3.0"),
        ("http://creativecommons.org/licenses/by-sa/4.0/", "CC-BY-SA-4.0"),
        ("http://creativecommons.org/licenses/by-nc-nd/4.0/", "CC-BY-NC-ND-4.0"),
        ("http://creativecommons.org/licenses/by/4.0/legalcode", "CC-BY-4.0"),
        ("https://www.creativecommons.org/licenses/by-nd/2.5/deed.fr", "CC-BY-ND-2.5"),
        ("https://huh.harvard.edu/access-digital-reproductions-works-public-domain", "unknown"),
        ("Usage Conditions Apply", "unknown"),
        ("All rights reserved", "all-rights-reserved"),
        ("© 2021 Jane Doe", "all-rights-reserved"),
        ("CC BY-NC 4.0", "CC-BY-NC-4.0"),
        ("CC_BY_4_0", "CC-BY-4.0"),
        ("CC_BY_NC_4_0", "CC-BY-NC-4.0"),
        ("CC0_1_0", "CC0-1.0"),
        ("Public Domain Mark 1.0", "PDM-1.0"),
        ("Attribution-NonCommercial-ShareAlike 4.0 International", "CC-BY-NC-SA-4.0"),
        ("UNSPECIFIED", "unknown"),
        # free text is no licence, and nothing is read as more permissive or later than it says
        ("Photo by John Smith", "unknown"),
        ("Used by permission", "unknown"),
        ("Image by Museum, non commercial use only", "unknown"),
        ("Creative Commons Attribution Non Commercial 4.0", "CC-BY-NC-4.0"),
        ("CC BY 2.1 JP", "unknown"),
        ("http://creativecommons.org/licenses/by/2.1/jp/", "unknown"),
        ("CC BY-SA 3.0 and 4.0", "unknown"),
        ("BY-NC-SA 3.0", "CC-BY-NC-SA-3.0"),
        ("Creative Commons Attribution-NoDerivatives 4.0 International License", "CC-BY-ND-4.0"),
        ("CC0 1.0 Universal", "CC0-1.0"),
        (None, None),
        ("  ", None),
    ],
)
def test_licence_normalization_on_real_values(raw: str | None, expected: str | None) -> None:
    assert normalize_license(raw) == expected


def test_every_licence_in_the_recordings_is_mapped() -> None:
    values = set()
    for name in ("pygbif_test_search_key2.json", "rgbif_occ_search_datasetkey.json"):
        for exchange in json.loads((RECORDED / name).read_text()):
            for record in exchange["response"]["body"]["results"]:
                values |= {m.get("license") for m in record.get("media", [])}
    mapped = {v: normalize_license(v) for v in values if v}
    assert mapped and all(m is not None for m in mapped.values())
    assert {"CC-BY-4.0", "CC0-1.0", "CC-BY-NC-4.0"} <= set(mapped.values())


def _table(con: duckdb.DuckDBPyConnection, rows: list[dict]) -> None:
    records = [
        {
            "key": int(r["gbifID"]), "gbifID": r["gbifID"], "speciesKey": r["species"], "datasetKey": r["dataset"],
            "publishingOrgKey": "00000000-0000-0000-0000-000000000001",
            "license": "http://creativecommons.org/licenses/by/4.0/legalcode",
            "media": [
                {"type": r.get("type", "StillImage"), "format": r.get("format", "image/jpeg"), "identifier": url,
                 "license": r.get("license", "CC0_1_0")}
                for url in r["urls"]
            ],
        }
        for r in rows
    ]  # fmt: skip
    load_search_records(con, records, required_fields(_recipe()))


def _pool(sizes: dict[tuple[str, str], int], media: int = 1) -> list[dict]:
    rows, n = [], 0
    for (species, dataset), size in sizes.items():
        for _ in range(size):
            n += 1
            rows.append(
                {
                    "gbifID": str(n),
                    "species": species,
                    "dataset": dataset,
                    "urls": [f"https://h{n % 7}.org/{n}/{m}.jpg" for m in range(media)],
                }
            )
    return rows


DATASET_A = "7a3679ef-5582-4aaa-81f0-8c2545cafc81"
DATASET_B = "50c9509d-22c7-4a22-a47d-8c48425ef4a7"


def test_balance_minus_one_gives_smallest_stream_times_streams(tmp_path: Path) -> None:
    con = duckdb.connect()
    _table(
        con,
        _pool({("1", DATASET_A): 30, ("1", DATASET_B): 12, ("2", DATASET_A): 50, ("2", DATASET_B): 20}),
    )
    result = build_manifest(con, _recipe(balance__nb_samples=-1), tmp_path / "m.parquet")
    per_stream = dict(
        con.execute("SELECT stream, count(*) FILTER (WHERE selected) FROM media_manifest GROUP BY stream").fetchall()
    )
    assert set(per_stream.values()) == {12}
    assert result.selected == 48
    ranks = con.execute("SELECT stream, min(rank), max(rank), count(*) FROM media_manifest GROUP BY stream").fetchall()
    assert all(lo == 1 and hi == n for _, lo, hi, n in ranks)  # every candidate ranked: the reserve
    assert con.execute("SELECT bool_and((rank <= 12) = selected) FROM media_manifest").fetchone()[0]


def test_a_balance_the_candidates_cannot_meet_is_noted(tmp_path: Path) -> None:
    """nb_samples above what the filters left, streams below nb_samples_per_stream, and labels
    too small for a split's share: the set is smaller and less even than the recipe says."""
    con = duckdb.connect()
    _table(con, _pool({("1", DATASET_A): 30, ("1", DATASET_B): 3, ("2", DATASET_A): 50, ("2", DATASET_B): 20}))
    result = build_manifest(con, _recipe(balance__nb_samples=400), tmp_path / "m.parquet")
    assert result.selected == 103
    assert any(n.startswith("nb_samples 400 asked for, 103 candidates pass the filters") for n in result.notes)
    assert "3 to 50 per stream" in " ".join(result.notes)
    result = build_manifest(
        con, _recipe(balance__nb_samples=None, balance__nb_samples_per_stream=25), tmp_path / "m.parquet"
    )
    assert any(n.startswith("2 of 4 stream(s) have fewer than nb_samples_per_stream 25") for n in result.notes)
    small = build_manifest(
        con, _recipe(balance__nb_samples=None, balance__nb_samples_per_stream=1), tmp_path / "m.parquet"
    )
    assert any("label(s) have no val image" in n for n in small.notes)


def test_sample_is_seeded_random_not_first_n(tmp_path: Path) -> None:
    con = duckdb.connect()
    _table(con, _pool({("1", DATASET_A): 200}))
    build_manifest(con, _recipe(balance__nb_samples_per_stream=20, balance__nb_samples=None), tmp_path / "m.parquet")
    chosen = {r[0] for r in con.execute("SELECT gbifID FROM media_manifest WHERE selected").fetchall()}
    assert len(chosen) == 20 and chosen != {str(i) for i in range(1, 21)}
    build_manifest(con, _recipe(balance__nb_samples_per_stream=20, balance__nb_samples=None), tmp_path / "m.parquet")
    assert chosen == {r[0] for r in con.execute("SELECT gbifID FROM media_manifest WHERE selected").fetchall()}
    build_manifest(
        con,
        _recipe(balance__nb_samples_per_stream=20, balance__nb_samples=None, balance__seed=7),
        tmp_path / "m.parquet",
    )
    assert chosen != {r[0] for r in con.execute("SELECT gbifID FROM media_manifest WHERE selected").fetchall()}


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=500), min_size=1, max_size=8),
    nb_samples=st.one_of(st.none(), st.just(-1), st.integers(min_value=1, max_value=3000)),
    per_stream=st.one_of(st.none(), st.integers(min_value=1, max_value=400)),
    weighted=st.booleans(),
)
def test_stream_targets_properties(
    sizes: list[int], nb_samples: int | None, per_stream: int | None, weighted: bool
) -> None:
    streams = {f"s{i}": n for i, n in enumerate(sizes)}
    targets = stream_targets(streams, nb_samples, per_stream, weighted)
    cap = per_stream if per_stream is not None else float("inf")
    assert all(0 <= targets[s] <= min(n, cap) for s, n in streams.items())
    available = sum(min(n, cap) for n in streams.values())
    if nb_samples is None:
        assert targets == {s: int(min(n, cap)) for s, n in streams.items()}
    else:
        total = len(sizes) * min(sizes) if nb_samples == -1 else nb_samples
        assert sum(targets.values()) == min(total, available)
        if nb_samples == -1 and per_stream is None and not weighted:  # weighted streams trade balance for size
            assert set(targets.values()) <= {min(sizes)}
        if not weighted and sum(targets.values()) < available:
            # round robin: no open stream sits more than one below another
            open_ = [targets[s] for s, n in streams.items() if targets[s] < min(n, cap)]
            assert not open_ or max(targets.values()) - min(open_) <= 1


def test_split_grouped_by_occurrence_stable_and_close_to_fractions(tmp_path: Path) -> None:
    con = duckdb.connect()
    _table(con, _pool({("1", DATASET_A): 50_000, ("2", DATASET_B): 50_000}, media=2))
    build_manifest(con, _recipe(balance__nb_samples=None), tmp_path / "m.parquet")
    fractions = dict(
        con.execute("SELECT split, count(DISTINCT gbifID) / 100000 FROM media_manifest GROUP BY split").fetchall()
    )
    assert (
        abs(fractions["train"] - 0.8) < 0.01
        and abs(fractions["val"] - 0.1) < 0.01
        and abs(fractions["test"] - 0.1) < 0.01
    )
    assert check_split_leakage(con) == []
    before = dict(con.execute("SELECT gbifID, split FROM media_manifest").fetchall())
    con.execute("DELETE FROM occurrences WHERE CAST(gbifID AS INTEGER) % 3 = 0")  # a refresh with fewer records
    build_manifest(con, _recipe(balance__nb_samples=None), tmp_path / "m.parquet")
    after = dict(con.execute("SELECT gbifID, split FROM media_manifest").fetchall())
    assert all(before[g] == s for g, s in after.items())


def test_filter_funnel_counts_each_removal(tmp_path: Path) -> None:
    con = duckdb.connect()
    rows = _pool({("1", DATASET_A): 10})
    rows[0]["license"] = "All rights reserved"
    rows[1]["license"] = None
    rows[2]["urls"] = rows[3]["urls"]  # the same URL twice
    rows.append(
        {
            "gbifID": "999",
            "species": "1",
            "dataset": "00000000-0000-0000-0000-0000000000aa",
            "urls": ["https://h1.org/x.jpg"],
        }
    )
    _table(con, rows)
    recipe = _recipe(
        filters__publishers={"deny": ["00000000-0000-0000-0000-0000000000aa"]},
        filters__hosts={"deny": ["h2.org"]},
    )
    result = build_manifest(con, recipe, tmp_path / "m.parquet")
    removed = {f["step"].split(" (")[0]: f["removed"] for f in result.funnel}
    assert removed["licence missing"] == 1
    assert removed["licence not in ['CC0-1.0', 'CC-BY-4.0', 'CC-BY-NC-4.0', 'CC-BY-SA-4.0']"] == 1
    assert removed["publisher denied"] == 1
    assert removed["identical URL kept once"] == 1
    assert removed["host denied"] >= 1
    assert result.rows == result.funnel[-1]["remaining"]


def test_format_and_type_spellings_publishers_use_are_read_as_the_recipe_names_them(tmp_path: Path) -> None:
    con = duckdb.connect()
    spellings = [("image/jpg", "StillImage"), (" IMAGE/JPEG; charset=binary", "Image"), ("jpg", "StillImage "),
                 ("image/pjpeg", "http://purl.org/dc/dcmitype/StillImage"), ("image/jpeg", "stillimage")]  # fmt: skip
    rows = _pool({("1", DATASET_A): len(spellings) + 2})
    for row, (fmt, kind) in zip(rows, spellings, strict=False):
        row["format"], row["type"] = fmt, kind
    rows[-2]["format"] = "audio/mpeg"  # still refused
    rows[-1]["type"] = "Sound"
    _table(con, rows)
    result = build_manifest(con, _recipe(), tmp_path / "m.parquet")
    removed = {f["step"].split(" (")[0]: f["removed"] for f in result.funnel}
    assert removed["format not in ['image/jpeg', 'image/png']"] == 1
    assert removed["media type not in ['StillImage']"] == 1
    assert result.rows == len(spellings)


def test_occurrence_licence_fallback_only_when_allowed(tmp_path: Path) -> None:
    con = duckdb.connect()
    rows = _pool({("1", DATASET_A): 5})
    for row in rows:
        row["license"] = None
    _table(con, rows)
    assert build_manifest(con, _recipe(), tmp_path / "m.parquet").rows == 0
    result = build_manifest(con, _recipe(filters__allow_occurrence_license=True), tmp_path / "m.parquet")
    assert result.rows == 5
    assert con.execute("SELECT DISTINCT license_source, license_id FROM media_manifest").fetchall() == [
        ("occurrence", "CC-BY-4.0")
    ]


def test_strict_host_allow_list_and_one_media_per_occurrence(tmp_path: Path) -> None:
    con = duckdb.connect()
    _table(con, _pool({("1", DATASET_A): 30}, media=3))
    result = build_manifest(
        con,
        _recipe(filters__hosts={"allow": ["h1.org"]}, filters__one_media_per_occurrence=True),
        tmp_path / "m.parquet",
    )
    hosts = {r[0] for r in con.execute("SELECT DISTINCT host FROM media_manifest").fetchall()}
    assert hosts == {"h1.org"}
    assert con.execute("SELECT max(c) FROM (SELECT count(*) c FROM media_manifest GROUP BY gbifID)").fetchone()[0] == 1
    assert result.rows > 0


def test_missing_label_field_is_a_clear_error(tmp_path: Path) -> None:
    con = duckdb.connect()
    con.register("t", pa.table({"gbifID": ["1"]}))
    con.execute("CREATE TABLE occurrences AS SELECT * FROM t")
    with pytest.raises(ValueError, match=r"'speciesKey' .* is not in `occurrences`"):
        build_manifest(con, _recipe(), tmp_path / "m.parquet")


def test_a_label_field_with_no_value_is_a_clear_error(tmp_path: Path) -> None:
    """A field no occurrence carries (or one GBIF does not have) is a column of NULLs after ingest:
    say so, not "the filters removed all"."""
    con = duckdb.connect()
    _table(con, _pool({("1", DATASET_A): 5}))
    con.execute('ALTER TABLE occurrences ADD COLUMN "lifeStage" VARCHAR')
    with pytest.raises(ValueError, match=r"label: 'lifeStage' has no value in any of the 5 media rows"):
        build_manifest(con, _recipe(label="lifeStage"), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"balance.split_streams_by: 'lifeStage' has no value"):
        build_manifest(con, _recipe(balance__split_streams_by=["lifeStage"]), tmp_path / "m.parquet")


TRICKY_URLS = [
    "http://127.0.0.41:9112?@127.0.0.2/q.jpg", "http://127.0.0.41:9112#@127.0.0.2/h.jpg", "http://a@b@c.org/x",
    "http://user:pw@Host.Example.org:80/p", "http://[::1]:8080/x", "https://[2001:db8::1]/a",
    "http://a.org\\@b.org/x", "http://a.org\\x/y", "HTTP://UPPER.org/X", "http://a.org", "http://a.org/p@q.org/x",
    "http://a.org?x@y", "http:///x", "http://%61.org/x", "http://bücher.example/x", "http://BÜCHER.example/x",
    "http://a.org.:80/", "http://127.1/x", "http://[::1/x", "https://h.org:443/p?q=1#f",
]  # fmt: skip


def test_manifest_host_is_the_host_the_engine_connects_to() -> None:
    """The host a filter judges is the host the request goes to: a URL that names an allowed host
    after "?@" or "#@" (a parser differential) cannot slip past `hosts.allow`."""
    from gbif_assets.fetch.engine import host_of
    from gbif_assets.manifest.build import host_sql, register_idna_host

    con = duckdb.connect()
    register_idna_host(con)
    rows = con.execute(f"SELECT u, {host_sql('u')} FROM unnest(?) t(u)", [TRICKY_URLS]).fetchall()
    assert [(u, h) for u, h in rows if h != host_of(u)] == []
    assert dict(rows)["http://127.0.0.41:9112?@127.0.0.2/q.jpg"] == "127.0.0.41"


def test_host_entries_addresses_and_wildcards(tmp_path: Path) -> None:
    """An address matches only itself (0.0.2 is not 127.0.0.2); "*.name" only its subdomains."""
    urls = ["http://127.0.0.2/a.jpg", "http://10.0.0.2/b.jpg", "http://x.h.org/c.jpg", "http://h.org/d.jpg",
            "http://127.0.0.41?@127.0.0.2/e.jpg"]  # fmt: skip
    con = duckdb.connect()
    _table(con, [{"gbifID": str(i), "species": "1", "dataset": DATASET_A, "urls": [u]} for i, u in enumerate(urls, 1)])
    for allow, kept in (
        (["127.0.0.2"], {"http://127.0.0.2/a.jpg"}),
        (["*.h.org"], {"http://x.h.org/c.jpg"}),
        (["h.org"], {"http://x.h.org/c.jpg", "http://h.org/d.jpg"}),
    ):
        build_manifest(con, _recipe(filters__hosts={"allow": allow}), tmp_path / "m.parquet")
        assert {r[0] for r in con.execute("SELECT identifier FROM media_manifest").fetchall()} == kept, allow


def test_excluded_lists_images_on_disk_the_filters_now_refuse(tmp_path: Path) -> None:
    """Only files on disk are looked up; a URL GBIF dropped (not in `occurrences`) is not excluded
    (that is `refresh_vanished`'s business), one the filters refuse is."""
    import hashlib

    from gbif_assets.manifest import write_excluded

    con = duckdb.connect()
    urls = ["https://h1.org/a.jpg", "https://h2.org/b.jpg"]
    _table(con, [{"gbifID": str(i), "species": "1", "dataset": DATASET_A, "urls": [u]} for i, u in enumerate(urls, 1)])
    home = tmp_path / "home"
    build_manifest(con, _recipe(filters__hosts={"deny": ["h2.org"]}), home / "metadata" / "manifest.parquet")
    folder = home / "images" / "train" / "1"
    folder.mkdir(parents=True)
    for url in [*urls, "https://gone.org/c.jpg"]:
        (folder / f"{hashlib.sha1(url.encode()).hexdigest()}.jpg").write_bytes(b"x")
    assert write_excluded(con, home) == 1
    excluded = pq.read_table(home / "metadata" / "excluded.parquet").column("url_sha1").to_pylist()
    assert excluded == [hashlib.sha1(urls[1].encode()).hexdigest()]


def test_split_hash_in_64_bit_arithmetic_equals_the_128_bit_modulo() -> None:
    con = duckdb.connect()
    fast = _md5_mod("'0:split:' || CAST(i AS VARCHAR)", 10**9)
    slow = "md5_number('0:split:' || CAST(i AS VARCHAR)) % 1000000000"
    assert con.execute(f"SELECT count(*) FILTER (WHERE {fast} <> {slow}) FROM range(200000) t(i)").fetchone()[0] == 0


def test_stream_target_counts_one_labels_selection_when_streams_span_labels(tmp_path: Path) -> None:
    con = duckdb.connect()
    _table(con, _pool({("1", DATASET_A): 40, ("2", DATASET_A): 10}))
    recipe = _recipe(
        balance__split_streams_by=["datasetKey"], balance__nb_samples_per_stream=20, balance__nb_samples=None
    )
    build_manifest(con, recipe, tmp_path / "m.parquet")
    rows = con.execute(
        "SELECT label, any_value(stream_target), count(*) FILTER (WHERE selected) FROM media_manifest GROUP BY label"
    ).fetchall()
    assert sum(r[2] for r in rows) == 20
    assert all(target == selected for _, target, selected in rows)


def test_manifest_is_parquet_behind_a_view_that_replaces_an_old_table(tmp_path: Path) -> None:
    db, out = tmp_path / "warehouse.duckdb", tmp_path / "metadata" / "manifest.parquet"
    con = duckdb.connect(str(db))
    _table(con, _pool({("1", DATASET_A): 30, ("2", DATASET_B): 30}))
    con.execute("CREATE TABLE media_manifest AS SELECT 1 AS stale")  # what an earlier version left
    result = build_manifest(con, _recipe(balance__nb_samples=None), out)
    con.close()
    assert not list(out.parent.glob("*.tmp"))
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM media_manifest").fetchone()[0] == result.rows == 60
    assert con.execute(f"SELECT count(*) FROM read_parquet('{out}')").fetchone()[0] == 60
    assert {"rank", "selected", "split", "url_sha1", "stream_target", "license_id"} <= {
        r[0] for r in con.execute("DESCRIBE media_manifest").fetchall()
    }


def test_a_failed_rebuild_keeps_the_previous_manifest(tmp_path: Path) -> None:
    con = duckdb.connect()
    out = tmp_path / "manifest.parquet"
    _table(con, _pool({("1", DATASET_A): 30}))
    build_manifest(con, _recipe(balance__nb_samples=None), out)
    before = out.read_bytes()
    con.execute("ALTER TABLE occurrences DROP COLUMN media_index")  # a broken occurrences table
    with pytest.raises(duckdb.Error):
        build_manifest(con, _recipe(balance__nb_samples=None), out)
    assert out.read_bytes() == before and not list(tmp_path.glob("*.tmp"))
    assert con.execute("SELECT count(*) FROM media_manifest").fetchone()[0] == 30
