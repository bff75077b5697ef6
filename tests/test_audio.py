"""Audio decoding of every container we promise, and pause-aware windowing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from ml_backend.audio import (
    SAMPLE_RATE,
    AudioDecodeError,
    decode_audio,
    split_at_pauses,
)

FORMATS = {
    "wav": ["-c:a", "pcm_s16le"],
    "mp3": ["-c:a", "libmp3lame"],
    "m4a": ["-c:a", "aac"],
    "flac": ["-c:a", "flac"],
    "ogg": ["-c:a", "libvorbis"],
    "aiff": ["-c:a", "pcm_s16be"],
    "webm": ["-c:a", "libopus"],
}


@pytest.fixture(scope="module")
def tone_files(tmp_path_factory) -> dict[str, Path]:
    """A 2 s 440 Hz stereo tone at 44.1 kHz in each format."""
    out = tmp_path_factory.mktemp("formats")
    files = {}
    for ext, codec in FORMATS.items():
        path = out / f"tone.{ext}"
        subprocess.run(
            ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi",
             "-i", "sine=frequency=440:duration=2:sample_rate=44100",
             "-ac", "2", *codec, "-y", str(path)],
            check=True,
        )
        files[ext] = path
    return files


@pytest.mark.parametrize("ext", list(FORMATS))
def test_decodes_every_format_to_16k_mono_float32(tone_files, ext):
    audio = decode_audio(tone_files[ext])
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size / SAMPLE_RATE - 2.0) < 0.1  # compressed codecs pad a few ms
    # the tone survives: its dominant frequency is 440 Hz
    second = audio[:SAMPLE_RATE]
    peak_hz = np.argmax(np.abs(np.fft.rfft(second))) * SAMPLE_RATE / second.size
    assert abs(peak_hz - 440) <= 2


def test_decodes_bytes(tone_files):
    audio = decode_audio(tone_files["flac"].read_bytes())
    assert abs(audio.size / SAMPLE_RATE - 2.0) < 0.05


def test_real_stereo_and_odd_rates(shared_audio):
    jfk = decode_audio(shared_audio / "jfk_en.flac")  # 44.1 kHz stereo
    assert abs(jfk.size / SAMPLE_RATE - 11.0) < 0.1
    assert decode_audio(shared_audio / "dictee_fr.aiff").size > SAMPLE_RATE


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty"), (b"this is not audio at all" * 50, "cannot decode"), (b"RIFF\x00\x00\x00\x00WAVEfmt ", "")],
)
def test_bad_input_raises_one_clear_error_naming_the_file(tmp_path, content, reason):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(content)
    with pytest.raises(AudioDecodeError) as err:
        decode_audio(bad)
    assert err.value.source == str(bad)
    assert str(bad) in str(err.value)
    assert reason in err.value.reason


def test_truncated_file_is_an_error_or_shorter_audio(tmp_path, tone_files):
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(tone_files["mp3"].read_bytes()[:200])
    try:
        audio = decode_audio(cut)
    except AudioDecodeError as exc:
        assert "cut.mp3" in str(exc)
    else:
        assert audio.size < 2 * SAMPLE_RATE


def test_missing_file(tmp_path):
    with pytest.raises(AudioDecodeError, match="file not found"):
        decode_audio(tmp_path / "nope.wav")


def test_duration_limit(tone_files):
    with pytest.raises(AudioDecodeError, match="longer than the 1 s limit"):
        decode_audio(tone_files["wav"], max_seconds=1)
    assert decode_audio(tone_files["wav"], max_seconds=5).size > 0


def test_split_at_pauses_cuts_in_silence():
    rng = np.random.default_rng(0)
    def speech(s):
        return rng.standard_normal(int(s * SAMPLE_RATE)).astype(np.float32) * 0.3
    def silence(s):
        return np.zeros(int(s * SAMPLE_RATE), dtype=np.float32)
    audio = np.concatenate([speech(27), silence(0.5), speech(20), silence(1.0), speech(15)])
    windows = split_at_pauses(audio)
    assert windows[0][0] == 0 and windows[-1][1] == audio.size
    assert all(b == c for (_, b), (c, _) in zip(windows, windows[1:]))  # contiguous
    assert all((e - s) <= 30 * SAMPLE_RATE for s, e in windows)
    first_cut = windows[0][1] / SAMPLE_RATE
    assert 27.0 <= first_cut <= 27.5  # inside the pause, not mid-"speech"


def test_short_audio_is_one_window():
    assert split_at_pauses(np.zeros(SAMPLE_RATE * 5, dtype=np.float32)) == [(0, SAMPLE_RATE * 5)]


def test_without_ffmpeg_16k_wav_still_decodes_like_ffmpeg(tmp_path, monkeypatch):
    path = tmp_path / "tone16k.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                    "sine=frequency=300:duration=1.5:sample_rate=16000", "-ac", "2", "-c:a", "pcm_s16le", "-y",
                    str(path)], check=True)
    with_ffmpeg = decode_audio(path)
    monkeypatch.setattr("ml_backend.audio.shutil.which", lambda name: None)
    without = decode_audio(path)
    assert without.dtype == np.float32 and without.shape == with_ffmpeg.shape
    assert np.abs(without - with_ffmpeg).max() < 1e-4
    assert np.array_equal(decode_audio(path.read_bytes()), without)
    with pytest.raises(AudioDecodeError, match="longer than the 1 s limit"):
        decode_audio(path, max_seconds=1)


def test_without_ffmpeg_other_audio_is_a_clear_error(tmp_path, tone_files, monkeypatch):
    monkeypatch.setattr("ml_backend.audio.shutil.which", lambda name: None)
    with pytest.raises(AudioDecodeError, match="ffmpeg is not installed.*44100 Hz"):
        decode_audio(tone_files["wav"])
    with pytest.raises(AudioDecodeError, match="ffmpeg is not installed.*not a PCM WAV"):
        decode_audio(tone_files["mp3"])
