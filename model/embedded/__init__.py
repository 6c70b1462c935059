"""The embedded default checkpoint: a tiny Dots1 model trained on the King James Bible by
scripts/train_embedded_model.py (see README.md here)."""
from pathlib import Path

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "dots1-tiny"
