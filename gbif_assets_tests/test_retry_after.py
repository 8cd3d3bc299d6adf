"""Retry-After as publishers and GBIF send it, and as they get it wrong."""

from __future__ import annotations

import email.utils
import time

import pytest

from gbif_assets.retry_after import retry_after_seconds


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        (None, 5.0),
        ("", 5.0),
        ("\u00b2", 5.0),  # str.isdigit is true for it, float() refuses it
        ("\u0663", 5.0),  # an Arabic-Indic digit
        ("-30", 5.0),
        ("1.5", 5.0),
        ("soon, maybe", 5.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past: go now
        ("Wed, 32 Oct 2015 07:28:00 GMT", 5.0),
        ("Wed, 21 Oct 99999 07:28:00 GMT", 5.0),
    ],
)
def test_retry_after_values(value: str | None, expected: float) -> None:
    assert retry_after_seconds(value, 5.0) == expected


def test_retry_after_as_an_http_date() -> None:
    assert 55 <= retry_after_seconds(email.utils.formatdate(time.time() + 60, usegmt=True), 5.0) <= 60
