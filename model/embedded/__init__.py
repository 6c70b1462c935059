"""The embedded default checkpoint: a tiny Dots1 model built by scripts/build_tiny_model.py."""
from pathlib import Path

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "dots1-tiny"
