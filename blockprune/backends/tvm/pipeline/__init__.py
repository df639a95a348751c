"""Relax -> executable: fast-math legalization, fusion, our CPU schedules; the GPU pipeline."""
