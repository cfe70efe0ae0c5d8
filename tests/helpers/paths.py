"""Paths the tests read: the repository root, the shipped sets, the shared evaluation data."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETS = ROOT / "neuron_sets"
DATA = ROOT.parent / "shared" / "data"
PARAREL = DATA / "pararel"
