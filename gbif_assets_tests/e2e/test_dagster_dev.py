"""A live `dagster dev` (webserver + daemon) on loopback, driven over GraphQL like the UI does."""

from __future__ import annotations

import os
import shutil
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
    shutil.copy(ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
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
    run_id = client.submit_job_execution(
        "invasive_plants_images_job", tags={"dagster/partition": "5352251"}
    )
    assert _wait(client, run_id) == DagsterRunStatus.SUCCESS, (tmp_path / "dagster_dev.log").read_text()[-4000:]
    home = tmp_path / "data" / "invasive_plants"
    assert (home / "metadata" / "downloads" / "5352251.parquet").is_file()
    assert any((home / "images").rglob("*.jp*g"))
    log = (tmp_path / "dagster_dev.log").read_text()
    assert "UserWarning" not in log and "DeprecationWarning" not in log
