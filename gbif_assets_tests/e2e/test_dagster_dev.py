"""A live `dagster dev` (webserver + daemon) on loopback, driven over GraphQL like the UI does."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from dagster import DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient

from gbif_assets_tests.conftest import GBIF_TEST_PASSWORD, GBIF_TEST_USER, ROOT, copy_recipe

pytestmark = pytest.mark.slow
TERMINAL = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def dagster_dev(emulator, tmp_path: Path) -> Iterator[tuple[DagsterGraphQLClient, Path, str]]:
    """`dagster dev` with the project's workspace.yaml and dagster.yaml in a fresh DAGSTER_HOME."""
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    # the project's dagster.yaml, with the pools at 1 so the backfill test can see the limit hold
    config = (ROOT / "dagster.yaml").read_text().replace("default_limit: 3", "default_limit: 1")
    (dagster_home / "dagster.yaml").write_text(config)
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    copy_recipe("invasive_plants", datasets)
    port = _free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        "GBIF_API_URL": emulator.api_url,
        "GBIF_ASSETS_HOME": str(tmp_path / "data"),
        "GBIF_ASSETS_DATASETS": str(datasets),
        "GBIF_ASSETS_ALLOW_PRIVATE_HOSTS": "1",
        "GBIF_USERNAME": GBIF_TEST_USER,
        "GBIF_PASSWORD": GBIF_TEST_PASSWORD,
        "GBIF_EMAIL": "test@example.org",
    }
    log = (tmp_path / "dagster_dev.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagster", "dev", "-w", str(ROOT / "workspace.yaml"),
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "dagster_dev.log").read_text()[-4000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/server_info", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        else:
            pytest.fail("dagster dev did not come up in 180 s")
        yield DagsterGraphQLClient("127.0.0.1", port_number=port), tmp_path, port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _wait(client: DagsterGraphQLClient, run_id: str, timeout: float = 300) -> DagsterRunStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_run_status(run_id)
        if status in TERMINAL:
            return status
        time.sleep(1)
    raise AssertionError(f"run {run_id} not finished after {timeout} s")


def test_partition_run_launched_over_graphql(dagster_dev) -> None:
    client, tmp_path, _port = dagster_dev
    upstream = client.submit_job_execution(
        "__ASSET_JOB",
        asset_selection=[["invasive_plants", "occurrences"], ["invasive_plants", "media_manifest"]],
    )
    assert _wait(client, upstream) == DagsterRunStatus.SUCCESS
    run_id = client.submit_job_execution("invasive_plants_images_job", tags={"dagster/partition": "5352251"})
    assert _wait(client, run_id) == DagsterRunStatus.SUCCESS, (tmp_path / "dagster_dev.log").read_text()[-4000:]
    home = tmp_path / "data" / "invasive_plants"
    assert (home / "metadata" / "downloads" / "5352251.parquet").is_file()
    assert any((home / "images").rglob("*.jp*g"))
    log = (tmp_path / "dagster_dev.log").read_text()
    assert "UserWarning" not in log and "DeprecationWarning" not in log


BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""
BACKFILL_STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    ... on PartitionBackfill { status partitionStatuses { results { partitionName runStatus } } }
  }
}"""


def _graphql(port: int, query: str, variables: dict) -> dict:
    answer = requests.post(
        f"http://127.0.0.1:{port}/graphql",
        json={"query": query, "variables": variables},
        timeout=30,
    )
    answer.raise_for_status()
    body = answer.json()
    assert "errors" not in body, body
    return body["data"]


def test_backfill_of_every_label_under_pool_limits(dagster_dev) -> None:
    """A backfill of all labels: every partition succeeds, the image pool limit holds, no DuckDB lock error."""
    client, tmp_path, port = dagster_dev
    upstream = client.submit_job_execution(
        "__ASSET_JOB",
        asset_selection=[["invasive_plants", "occurrences"], ["invasive_plants", "media_manifest"]],
    )
    assert _wait(client, upstream) == DagsterRunStatus.SUCCESS
    labels = ["5352251", "3190653", "3189866"]
    params = {"assetSelection": [{"path": ["invasive_plants", "images"]}], "partitionNames": labels}
    launched = _graphql(port, BACKFILL, {"params": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        backfill = _graphql(port, BACKFILL_STATUS, {"id": launched["backfillId"]})["partitionBackfillOrError"]
        if backfill["status"] in (
            "COMPLETED",
            "COMPLETED_SUCCESS",
            "COMPLETED_FAILED",
            "FAILED",
            "CANCELED",
        ):
            break
        time.sleep(2)
    else:
        pytest.fail("backfill did not finish")
    home = tmp_path / "data" / "invasive_plants"
    for label in labels:
        assert (home / "metadata" / "downloads" / f"{label}.parquet").is_file(), label
        assert (home / "metadata" / "partitions" / f"{label}.parquet").is_file(), label
    # the image pool allows 1 step at a time in this instance: the partition steps never overlapped
    from dagster import DagsterEventType, DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    with DagsterInstance.from_ref(InstanceRef.from_dir(str(tmp_path / "dagster_home"))) as instance:
        spans = []
        for record in instance.get_run_records():
            if record.dagster_run.tags.get("dagster/partition") not in labels:
                continue
            assert record.dagster_run.status == DagsterRunStatus.SUCCESS, record.dagster_run.run_id
            events = instance.all_logs(record.dagster_run.run_id)
            start = [
                e.timestamp
                for e in events
                if e.dagster_event and e.dagster_event.event_type == DagsterEventType.STEP_START
            ]
            end = [
                e.timestamp
                for e in events
                if e.dagster_event and e.dagster_event.event_type == DagsterEventType.STEP_SUCCESS
            ]
            spans.append((min(start), max(end)))
            text = " ".join(e.message or "" for e in events)
            assert "Could not set lock" not in text and "Conflicting lock" not in text
    assert len(spans) == len(labels)
    spans.sort()
    assert all(later[0] >= earlier[1] - 0.05 for earlier, later in itertools.pairwise(spans)), spans
