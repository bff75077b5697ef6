"""Real speech for the learning benchmark: a folder of recordings with ``transcripts.json`` (+ ``speakers.json``).

``loopscribe bench corpus speechocean762 --repo GITDIR --out DIR`` writes such a folder from a
local git copy of ``jimbozhang/speechocean762`` (real read English by Mandarin-L1 adults and
children, CC BY 4.0): its **train split only**. The test split's speakers are reserved for
independent evaluation and are never written by this command.

Folder format (what ``bench loop --corpus DIR`` reads)::

    transcripts.json   {"000010011.wav": {"text": "We call it bear", "language": "en"}, ...}
    speakers.json      {"000010011.wav": "0001", ...}          (optional: speaker-disjoint splits)
    *.wav
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import tarfile
from pathlib import Path

from ml_backend.settings import Settings

RESERVED_SPLITS = ("test",)  # speechocean762's test speakers: independent evaluation only


def _git(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", f"--git-dir={repo}", *args], capture_output=True, check=True).stdout


def _kaldi_list(repo: Path, path: str) -> dict[str, str]:
    rows = {}
    for line in _git(repo, "show", f"HEAD:{path}").decode().splitlines():
        key, _, value = line.strip().partition(" ") if "\t" not in line else line.strip().partition("\t")
        if key:
            rows[key] = value.strip()
    return rows


def sentence_case(prompt: str) -> str:
    """``WE CALL IT BEAR`` → ``We call it bear``: what an annotator correcting Whisper would type.

    The corpus's prompts are all capitals; scoring ignores case, but training on capitals teaches the
    decoder another tokenization of every word, which no real annotation would.
    """
    words = prompt.lower().split()
    words = ["I" if w == "i" else "I'" + w[2:] if w.startswith("i'") else w for w in words]
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def prepare_speechocean762(repo: Path, out: Path, split: str = "train") -> int:
    """Write ``split`` of speechocean762 as a corpus folder; returns the number of utterances."""
    if split in RESERVED_SPLITS:
        raise SystemExit(f"the {split!r} split is reserved for independent evaluation: develop and tune on 'train'")
    texts = _kaldi_list(repo, f"{split}/text")
    speakers = _kaldi_list(repo, f"{split}/utt2spk")
    wavs = _kaldi_list(repo, f"{split}/wav.scp")
    wanted = {wavs[u]: u for u in texts if u in wavs}
    folders = sorted({str(Path(p).parent) for p in wanted})
    out.mkdir(parents=True, exist_ok=True)
    archive = _git(repo, "archive", "--format=tar", "HEAD", "--", *folders)
    written = {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar:
            if member.name in wanted:
                utt = wanted[member.name]
                data = tar.extractfile(member)
                if data is not None:
                    (out / f"{utt}.wav").write_bytes(data.read())
                    written[utt] = True
    (out / "transcripts.json").write_text(json.dumps(
        {f"{u}.wav": {"text": sentence_case(texts[u]), "language": "en"} for u in sorted(written)}, indent=1))
    (out / "speakers.json").write_text(json.dumps({f"{u}.wav": speakers.get(u, "") for u in sorted(written)},
                                                  indent=1))
    return len(written)


def bench_corpus(args: argparse.Namespace, settings: Settings) -> int:
    if args.name != "speechocean762":
        raise SystemExit(f"unknown corpus {args.name!r} (known: speechocean762)")
    n = prepare_speechocean762(Path(args.repo), Path(args.out), args.split)
    print(f"{n} utterances of speechocean762 ({args.split}) in {args.out}: transcripts.json, speakers.json")
    return 0


def load_corpus(root: Path) -> tuple[list[tuple[Path, str, str]], dict[str, str]]:
    """``[(path, text, language)]`` and ``{file name: speaker}`` (each file its own speaker without speakers.json)."""
    meta = json.loads((root / "transcripts.json").read_text())
    clips = [(root / name, m["text"], m.get("language") or "en") for name, m in sorted(meta.items())
             if isinstance(m, dict) and "text" in m and (root / name).is_file()]
    speakers_file = root / "speakers.json"
    speakers = json.loads(speakers_file.read_text()) if speakers_file.is_file() else {}
    return clips, {p.name: speakers.get(p.name) or p.name for p, _, _ in clips}
