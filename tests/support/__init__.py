"""Helpers shared by the unit and distributed tests (not tests themselves)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root
