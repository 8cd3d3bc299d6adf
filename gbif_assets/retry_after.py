"""Retry-After as seconds: one parser for the GBIF client and the image fetch engine.

Kept out of `gbif_assets.gbif`, whose package imports pygbif (half a second), so a fetch shard
process starts with the engine alone.
"""

from __future__ import annotations

import datetime as dt
import email.utils


def retry_after_seconds(value: str | None, default: float) -> float:
    """Retry-After as seconds, from either form GBIF and publishers use (seconds or HTTP-date)."""
    if not value:
        return default
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit also takes "²" and other digits float() refuses
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return default
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())
