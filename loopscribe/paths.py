"""Where the checkout's own files are: the repository root and the default labeling config."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LABEL_CONFIG = REPO_ROOT / "label_config.xml"
# 32 LJ Speech recordings (public domain) for the gate's general-speech check: data/regression-en/README.md
REGRESSION_EN = REPO_ROOT / "data" / "regression-en"


def default_regression_audio() -> str:
    """``REGRESSION_AUDIO`` for ``up`` and the benchmarks: the bundled English set, and the shared recordings
    (other languages too) when this checkout has them."""
    folders = [REGRESSION_EN, shared_audio_dir()]
    return ",".join(str(f) for f in folders if (f / "transcripts.json").is_file())


def shared_audio_dir() -> Path:
    """``LOOPSCRIBE_SHARED_AUDIO``, else ``shared/audio`` beside the checkout: real recordings with transcripts."""
    return Path(os.environ.get("LOOPSCRIBE_SHARED_AUDIO") or REPO_ROOT.parent / "shared" / "audio")
