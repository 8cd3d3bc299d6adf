"""Dagster layer: assets, checks, sensors, schedules, resources and the `Definitions` factory."""
