"""Data shipped with TRAICE. ``traces/`` holds a SYNTHETIC hourly intensity trace (FR and DE,
48 hours from 2026-01-01, Electricity Maps CSV format) for trying --intensity-trace: its values
have a plausible daily shape but are not measurements."""
