"""Audio decoding (FFmpeg → 16 kHz mono float32) and pause-aware splitting into ≤30 s windows."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np

from .errors import AudioError

SAMPLE_RATE = 16_000
WINDOW_SECONDS = 30.0
DEFAULT_TIMEOUT = 120.0  # FFMPEG_TIMEOUT's default


class AudioDecodeError(AudioError):
    """Audio that cannot be decoded: missing, empty, corrupt, unsupported or over the limit."""


def decode_audio(
    source: str | Path | bytes,
    *,
    max_seconds: float | None = None,
    name: str | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> np.ndarray:
    """Decode any FFmpeg-readable audio (WAV/MP3/M4A/FLAC/OGG/AIFF/WebM …) to 16 kHz mono float32.

    ``max_seconds`` guards memory: longer audio raises :class:`AudioDecodeError` instead of
    being decoded in full. ``timeout`` (seconds) bounds FFmpeg's time on hostile input.
    Channels are mixed down as FFmpeg does, any sample rate is resampled.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if isinstance(source, bytes):
        if not source:
            raise AudioDecodeError(label, "empty input")
        data, input_arg = source, "pipe:0"
    else:
        path = Path(source)
        if not path.is_file():
            raise AudioDecodeError(label, "file not found")
        if path.stat().st_size == 0:
            raise AudioDecodeError(label, "file is empty")
        data, input_arg = None, str(path)

    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        audio = _read_wav(data if data is not None else path, label, max_seconds)
    else:
        audio = _run_ffmpeg(ffmpeg, data, input_arg, label, max_seconds, timeout)
    if audio.size == 0:
        raise AudioDecodeError(label, "no audio samples (not an audio file, or zero length)")
    if max_seconds is not None and audio.size > max_seconds * SAMPLE_RATE:
        raise AudioDecodeError(label, f"longer than the {max_seconds:g} s limit")
    if not np.isfinite(audio).all():
        raise AudioDecodeError(label, "decoded samples are not finite")
    return audio.copy()  # writable, owned


def _run_ffmpeg(ffmpeg: str, data: bytes | None, input_arg: str, label: str, max_seconds: float | None,
                timeout: float | None) -> np.ndarray:
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "0", "-i", input_arg]
    if max_seconds is not None:
        cmd += ["-t", f"{max_seconds + 1:.3f}"]  # read one second past the limit to detect "too long"
    cmd += ["-vn", "-f", "f32le", "-acodec", "pcm_f32le", "-ac", "1", "-ar", str(SAMPLE_RATE), "pipe:1"]
    try:
        proc = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AudioDecodeError(label, f"decoding took longer than {timeout:g} s (FFMPEG_TIMEOUT)") from None
    if proc.returncode != 0:
        detail = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = detail[-1] if detail else f"ffmpeg exited with {proc.returncode}"
        raise AudioDecodeError(label, f"cannot decode audio ({reason})")
    return np.frombuffer(proc.stdout, dtype=np.float32)


def _read_wav(source: bytes | Path, label: str, max_seconds: float | None) -> np.ndarray:
    """Without FFmpeg (a bare GPU box), 16 kHz PCM WAV is still readable; anything else is a clear error."""
    try:
        with wave.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), "rb") as wav:
            rate, channels, width, frames = (wav.getframerate(), wav.getnchannels(), wav.getsampwidth(),
                                             wav.getnframes())
            if rate != SAMPLE_RATE or width not in (2, 4) or channels > 2:
                raise AudioDecodeError(label, f"ffmpeg is not installed, and without it only 16 kHz 16/32-bit mono "
                                              f"or stereo PCM WAV can be read (this is {rate} Hz, {8 * width}-bit, "
                                              f"{channels} channels)")
            if max_seconds is not None and frames > (max_seconds + 1) * SAMPLE_RATE:
                frames = int((max_seconds + 1) * SAMPLE_RATE)
            raw = wav.readframes(frames)
    except (wave.Error, EOFError) as exc:
        raise AudioDecodeError(label, f"ffmpeg is not installed, and this is not a PCM WAV file ({exc})") from exc
    scale = float(2 ** (8 * width - 1))
    samples = np.frombuffer(raw, dtype=np.int16 if width == 2 else np.int32).astype(np.float32) / scale
    if channels == 2:  # FFmpeg's default stereo → mono matrix: (L + R) / √2
        return samples.reshape(-1, 2).sum(axis=1) * np.float32(np.sqrt(0.5))
    return samples


def content_hash(audio: np.ndarray) -> str:
    """SHA-256 of the decoded samples: identical audio in any container hashes the same."""
    return hashlib.sha256(np.ascontiguousarray(audio, dtype=np.float32).tobytes()).hexdigest()


def duration(audio: np.ndarray) -> float:
    return audio.shape[-1] / SAMPLE_RATE


def split_at_pauses(
    audio: np.ndarray,
    max_seconds: float = WINDOW_SECONDS,
    search_seconds: float = 5.0,
    frame_seconds: float = 0.02,
    pause_seconds: float = 0.2,
) -> list[tuple[int, int]]:
    """Cut ``audio`` into windows of at most ``max_seconds``, each cut at the quietest point.

    Each cut is placed in the middle of the quietest ``pause_seconds`` stretch within the
    last ``search_seconds`` before the limit, so words are not split where a pause exists. Returns sample
    ``(start, end)`` pairs covering the whole signal.
    """
    total = audio.shape[-1]
    limit = int(max_seconds * SAMPLE_RATE)
    if total <= limit:
        return [(0, total)]
    frame = max(1, int(frame_seconds * SAMPLE_RATE))
    search = int(search_seconds * SAMPLE_RATE)
    windows: list[tuple[int, int]] = []
    start = 0
    while total - start > limit:
        lo, hi = start + limit - search, start + limit
        region = audio[lo:hi]
        n_frames = region.size // frame
        energy = np.square(region[: n_frames * frame].reshape(n_frames, frame)).mean(axis=1)
        # Smooth over ~0.2 s so the minimum is the middle of a real pause, not a gap inside a word.
        span = max(1, int(pause_seconds / frame_seconds))
        smooth = np.convolve(energy, np.ones(span) / span, mode="same")
        cut = lo + int(np.argmin(smooth)) * frame + frame // 2
        windows.append((start, cut))
        start = cut
    windows.append((start, total))
    return windows
