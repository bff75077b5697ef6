"""Where the checkout's own files are: the repository root and the default labeling config."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LABEL_CONFIG = REPO_ROOT / "label_config.xml"
