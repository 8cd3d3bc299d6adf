"""What an ingest did: counts, skips by reason and plain-language notes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IngestResult:
    """Figures shown in the `occurrences` asset's metadata."""

    format: str
    occurrences: int
    media_rows: int
    rows_loaded: int
    skipped: dict[str, int] = field(default_factory=dict)
    missing_columns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


class ArchiveError(ValueError):
    """An archive that cannot be read; the message names the file and the problem."""
