"""The emulator answers as GBIF does: paging limits, facets, downloads, archives, DOIs, image cache."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
import urllib.error
import urllib.request
import zipfile

import pytest

from gbif_assets_tests.conftest import GBIF_TEST_PASSWORD, GBIF_TEST_USER

SPECIES = "5352251"
PREDICATE = {
    "type": "and",
    "predicates": [{"type": "equals", "key": "SPECIES_KEY", "value": SPECIES}],
}


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _post(url: str, body: object, user: str = GBIF_TEST_USER, password: str = GBIF_TEST_PASSWORD) -> tuple[int, str]:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(
        url,
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "Authorization": f"Basic {auth}"},
    )
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_search_caps_limit_and_uses_exact_content_type(emulator) -> None:
    status, headers, body = _get(f"{emulator.api_url}/occurrence/search?limit=500")
    page = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert page["limit"] == 300 and len(page["results"]) == 300 and page["count"] > 300
    assert isinstance(page["results"][0]["gbifID"], str) and isinstance(page["results"][0]["key"], int)


def test_offset_window_is_an_http_400(emulator) -> None:
    status, _, body = _get(f"{emulator.api_url}/occurrence/search?offset=99800&limit=300")
    assert status == 400 and b"100000" in body
    assert _get(f"{emulator.api_url}/occurrence/search?offset=99700&limit=300")[0] == 200


def test_repeated_parameters_or_different_ones_and(emulator) -> None:
    one = json.loads(_get(f"{emulator.api_url}/occurrence/search?limit=0&speciesKey={SPECIES}")[2])["count"]
    two = json.loads(_get(f"{emulator.api_url}/occurrence/search?limit=0&speciesKey={SPECIES}&speciesKey=3190653")[2])[
        "count"
    ]
    both = json.loads(
        _get(
            f"{emulator.api_url}/occurrence/search?limit=0&speciesKey={SPECIES}&datasetKey=7a3679ef-5582-4aaa-81f0-8c2545cafc81"
        )[2]
    )["count"]
    assert two > one > both > 0


def test_facets_have_gbif_shape(emulator) -> None:
    page = json.loads(
        _get(f"{emulator.api_url}/occurrence/search?limit=0&facet=datasetKey&facetLimit=2&speciesKey={SPECIES}")[2]
    )
    facet = page["facets"][0]
    assert facet["field"] == "DATASET_KEY" and len(facet["counts"]) == 2
    assert all(isinstance(c["name"], str) and c["count"] > 0 for c in facet["counts"])


def test_download_lifecycle(emulator) -> None:
    status, key = _post(
        f"{emulator.api_url}/occurrence/download/request",
        {"creator": GBIF_TEST_USER, "format": "DWCA", "predicate": PREDICATE},
    )
    assert status == 201
    assert (
        _post(
            f"{emulator.api_url}/occurrence/download/request",
            {"format": "DWCA", "predicate": PREDICATE},
        )[1]
        == key
    )  # same key within 48 h
    assert _get(f"{emulator.api_url}/occurrence/download/request/{key}.zip")[0] == 404  # not ready
    deadline = time.monotonic() + 10
    while json.loads(_get(f"{emulator.api_url}/occurrence/download/{key}")[2])["status"] != "SUCCEEDED":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    meta = json.loads(_get(f"{emulator.api_url}/occurrence/download/{key}")[2])
    assert meta["doi"].startswith("10.15468/dl.") and meta["totalRecords"] > 0
    assert json.loads(_get(f"{emulator.api_url}/occurrence/download/{meta['doi']}")[2])["key"] == key
    status, _, data = _get(f"{emulator.api_url}/occurrence/download/request/{key}.zip")  # urllib follows the 302
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = set(archive.namelist())
        assert {
            "meta.xml",
            "occurrence.txt",
            "multimedia.txt",
            "citations.txt",
            "rights.txt",
            "metadata.xml",
        } <= names
        rows = archive.read("occurrence.txt").decode().splitlines()
        header = rows[0].split("\t")
        species = {r.split("\t")[header.index("speciesKey")] for r in rows[1:]}
    assert species == {SPECIES} and len(rows) - 1 == meta["totalRecords"]
    emulator.set_status(key, "FILE_ERASED")
    assert _get(f"{emulator.api_url}/occurrence/download/request/{key}.zip")[0] == 410


def test_download_request_errors(emulator) -> None:
    url = f"{emulator.api_url}/occurrence/download/request"
    status, body = _post(url, {"predicate": PREDICATE}, password="wrong")
    assert status == 401 and f"Failed to authenticate user {GBIF_TEST_USER}" in body
    assert _post(url, {"predicate": PREDICATE, "colour": "blue"})[0] == 400
    assert _post(url, {"predicate": {"type": "sameAs", "key": "X"}})[0] == 400


def test_420_when_three_downloads_run(emulator) -> None:
    emulator.config.preparing_s = 60
    before = set(emulator.state.downloads)
    try:
        url = f"{emulator.api_url}/occurrence/download/request"
        codes = [
            _post(url, {"predicate": {"type": "equals", "key": "YEAR", "value": str(1900 + i)}})[0] for i in range(4)
        ]
    finally:
        emulator.config.preparing_s = 0.2
        for key in set(emulator.state.downloads) - before:  # free the user's slots for other tests
            emulator.set_status(key, "CANCELLED")
    assert codes[:3].count(201) == 3 and codes[3] == 420


def test_image_cache_serves_dead_links(emulator) -> None:
    record = next(r for r in emulator.pool.records() if r.get("media") and "127.0.0.5" in r["media"][0]["identifier"])
    url = record["media"][0]["identifier"]
    md5 = hashlib.md5(url.encode()).hexdigest()
    assert _get(url)[0] == 404  # the publisher link is dead
    status, _, body = _get(f"{emulator.api_url}/image/cache/occurrence/{record['gbifID']}/media/{md5}")
    assert status == 200 and body[:3] == b"\xff\xd8\xff"
    assert _get(f"{emulator.api_url}/image/cache/occurrence/{record['gbifID']}/media/{'0' * 32}")[0] == 404


def test_derived_dataset(emulator) -> None:
    body = {
        "title": "t",
        "sourceUrl": "https://example.org/x",
        "relatedDatasets": {"7a3679ef-5582-4aaa-81f0-8c2545cafc81": 3},
    }
    status, answer = _post(f"{emulator.api_url}/derivedDataset", body)
    assert status == 201 and json.loads(answer)["doi"].startswith("10.15468/dd.")
    assert _post(f"{emulator.api_url}/derivedDataset", {"title": "t"})[0] == 400


@pytest.mark.parametrize("layout", ["2014", "current"])
def test_archive_layouts(emulator, layout: str) -> None:
    emulator.config.media_layout = layout
    try:
        _, key = _post(
            f"{emulator.api_url}/occurrence/download/request",
            {
                "predicate": {
                    "type": "equals",
                    "key": "SPECIES_KEY",
                    "value": "3190653" if layout == "2014" else "3189866",
                },
                "format": "DWCA",
            },
        )
        emulator.set_status(key, "SUCCEEDED")
        _, _, data = _get(f"{emulator.api_url}/occurrence/download/request/{key}.zip")
    finally:
        emulator.config.media_layout = "current"
    header = zipfile.ZipFile(io.BytesIO(data)).read("multimedia.txt").decode().splitlines()[0].split("\t")
    assert header.index("created") == (7 if layout == "2014" else 9)
