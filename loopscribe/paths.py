"""Where the checkout's own files are: the repository root and the default labeling config."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LABEL_CONFIG = REPO_ROOT / "label_config.xml"


def shared_audio_dir() -> Path:
    """``LOOPSCRIBE_SHARED_AUDIO``, else ``shared/audio`` beside the checkout: real recordings with transcripts."""
    return Path(os.environ.get("LOOPSCRIBE_SHARED_AUDIO") or REPO_ROOT.parent / "shared" / "audio")
