"""The engine on real speech with the real bundled Whisper base (CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from loopscribe.demo import SENTENCES, speak, with_noise
from ml_backend.audio import SAMPLE_RATE, decode_audio
from ml_backend.transcription import TranscribeOptions, Transcription
from ml_backend.uncertainty import MAX_TOKEN_RUN, max_run
from training.metrics import error_rate

pytestmark = pytest.mark.slow

REAL_CLIPS = ["jfk_en.flac", "one_two_three_en.wav", "dictee_fr.aiff", "zh_short.flac",
              "two_speakers_stereo_en.wav", "comfyui_en.mp3", "mit_license_en_de.mp3"]


@pytest.fixture(scope="module")
def real_results(engine, clip) -> dict[str, Transcription]:
    """All real clips in one batched call (the way the backend calls the engine)."""
    return dict(zip(REAL_CLIPS, engine.transcribe([clip(n) for n in REAL_CLIPS])))


def test_jfk_sentence(real_results, transcripts):
    r = real_results["jfk_en.flac"]
    assert r.language == "en" and r.language_probability > 0.5
    assert error_rate([transcripts["jfk_en.flac"]["text"]], [r.text], "en") <= 0.05
    assert r.segments and r.segments[0].start < 1.0 and r.segments[-1].end <= r.duration + 0.01


def test_languages_detected_on_real_recordings(real_results):
    assert real_results["dictee_fr.aiff"].language == "fr"
    assert real_results["zh_short.flac"].language == "zh"
    assert real_results["one_two_three_en.wav"].language == "en"


def test_long_bilingual_file_windows_languages_and_timestamps(real_results):
    r = real_results["mit_license_en_de.mp3"]
    assert r.languages == ["en", "de"]
    assert r.duration > 55
    starts = [s.start for s in r.segments]
    assert starts == sorted(starts)
    assert all(s.start <= s.end <= r.duration + 0.01 for s in r.segments)
    english = " ".join(s.text for s in r.segments if s.language == "en")
    german = " ".join(s.text for s in r.segments if s.language == "de")
    assert "Permission is hereby granted" in english
    assert "substantial portions" in english  # the window's tail, re-decoded after Whisper stopped early
    assert "Software" in german and max(s.end for s in r.segments) > 45  # timestamps run past the first window
    assert not r.uncertainty.looks_like_repetition


def test_no_token_repeated_more_than_five_times(real_results):
    for name, r in real_results.items():
        words = r.text.split()
        assert max_run(words) <= MAX_TOKEN_RUN, (name, r.text)
        assert r.uncertainty.max_token_run <= MAX_TOKEN_RUN, (name, r.text)
        for s in r.segments:
            assert max_run(s.text.split()) <= MAX_TOKEN_RUN, (name, s.text)


@pytest.mark.parametrize("language", ["en", "de", "es", "it"])
def test_espeak_languages_detected(engine, espeak_dir, language):
    path = speak(SENTENCES[language][0], language, espeak_dir / f"{language}.wav")
    r = engine.transcribe([decode_audio(path)])[0]
    assert r.language == language, r
    assert error_rate([SENTENCES[language][0]], [r.text], language) <= 0.5, r.text


def test_confidence_separates_clean_from_noise_silence_and_wrong_language(engine, clip):
    jfk = clip("jfk_en.flac")
    clean, noisy, silence = engine.transcribe(
        [jfk, with_noise(jfk, snr_db=-5.0), np.zeros(5 * SAMPLE_RATE, dtype=np.float32)]
    )
    wrong = engine.transcribe([jfk], TranscribeOptions(language="ja"))[0]
    assert wrong.language == "ja"
    for other in (noisy, silence, wrong):
        assert clean.confidence > other.confidence, (clean.confidence, other)
    assert silence.uncertainty.no_speech_prob > 0.5


def test_results_are_typed_and_complete(real_results):
    for r in real_results.values():
        assert 0.0 <= r.confidence <= 1.0 and 0.0 <= r.language_probability <= 1.0
        u = r.uncertainty
        for value in (u.mean_entropy, u.max_entropy, u.mean_logprob, u.no_speech_prob, u.compression_ratio):
            assert np.isfinite(value)
        assert u.max_entropy >= u.mean_entropy >= 0
        assert r.model_version.startswith("whisper-base-")
        d = r.to_dict()
        assert {"text", "language", "language_probability", "confidence", "segments", "uncertainty"} <= set(d)


def test_translate_task_writes_english(engine, clip):
    r = engine.transcribe([clip("dictee_fr.aiff")], TranscribeOptions(task="translate"))[0]
    assert r.language == "fr"
    text = r.text.lower()  # reference: "c'est la dictée numéro un" ("this is dictation number one")
    assert "dictation" in text and ("number one" in text or "number 1" in text), r.text


def test_identical_audio_is_decoded_once(engine, clip):
    engine.clear_cache()
    jfk = clip("jfk_en.flac")
    batches: list[int] = []
    first = engine.transcribe([jfk, jfk.copy()], on_batch=batches.append)
    assert sum(batches) == 1  # two identical clips → one window decoded
    again = engine.transcribe([jfk], on_batch=batches.append)
    assert sum(batches) == 1 and again[0] == first[0] == first[1]
    other_options = engine.transcribe([jfk], TranscribeOptions(timestamps=False), on_batch=batches.append)
    assert sum(batches) == 2 and other_options[0].text


def test_batch_order_is_kept_and_bad_file_does_not_fail_the_batch(engine, shared_audio, tmp_path):
    corrupt = tmp_path / "corrupt.mp3"
    corrupt.write_bytes(b"\xff\xfb" + b"garbage" * 100)
    results = engine.transcribe_files([shared_audio / "dictee_fr.aiff", corrupt, shared_audio / "jfk_en.flac"])
    assert results[0].language == "fr"
    assert "corrupt.mp3" in str(results[1])
    assert results[2].language == "en"


def test_forced_unknown_language_is_a_clear_error(engine, clip):
    with pytest.raises(ValueError, match="unknown language"):
        engine.transcribe([clip("jfk_en.flac")], TranscribeOptions(language="xx"))


def test_temperature_fallback_runs_every_temperature_and_is_reproducible(engine, clip, monkeypatch):
    """Force every window to 'fail' the checks: each temperature is decoded once, seeded by the window's
    audio, so a clip samples the same tokens alone and beside another clip."""
    from ml_backend import uncertainty

    monkeypatch.setattr(uncertainty.Uncertainty, "needs_fallback", lambda self: True)
    temperatures: list[float] = []
    attempts: list[tuple[int, float, list[int]]] = []  # (window length, temperature, tokens)
    real_run = engine.decoder.run

    def spy(requests, on_result, **kwargs):
        def seen(result):
            temperatures.append(result.request.temperature)
            attempts.append((len(result.request.samples), result.request.temperature, result.sequence.tokens))
            return on_result(result)
        return real_run(requests, seen, **kwargs)

    monkeypatch.setattr(engine.decoder, "run", spy)
    options = TranscribeOptions(temperatures=(0.0, 0.5, 1.0), timestamps=False)
    engine.clear_cache()
    first = engine.transcribe([clip("jfk_en.flac")], options)[0]
    engine.clear_cache()
    second = engine.transcribe([clip("jfk_en.flac")], options)[0]
    assert temperatures == [0.0, 0.5, 1.0] * 2
    assert first.text == second.text and first.uncertainty == second.uncertainty
    assert not first.uncertainty.looks_like_repetition
    alone = sorted(attempts[:3])  # one window: its three attempts, in the first run
    assert sorted(attempts[3:]) == alone
    assert len({tuple(tokens) for _, _, tokens in alone}) > 1  # sampling drew other tokens than greedy

    attempts.clear()
    engine.clear_cache()
    engine.transcribe([clip("dictee_fr.aiff"), clip("jfk_en.flac")], options)
    assert [a for a in sorted(attempts) if a[0] == alone[0][0]] == alone


def test_an_adapter_beside_the_shared_base_decodes_as_its_merged_model(settings, clip, tmp_path):
    """SERVE_ADAPTERS=shared: one base with a project's LoRA adapter beside it gives the merged model's
    transcripts and scores, and the base's own requests stay the base's while the adapter is loaded."""
    from dataclasses import replace

    import torch
    from peft import get_peft_model

    from ml_backend.engine import WhisperEngine
    from ml_backend.model_store import resolve_base
    from ml_backend.whisper import load_whisper, quiet_peft
    from training.lora import LoraArguments, lora_config

    settings = replace(settings, dtype="float32")  # the same sums in another order: bf16 would round apart
    base = resolve_base(settings)
    with quiet_peft():
        whisper = load_whisper(base.path).model
        peft_model = get_peft_model(whisper, lora_config(LoraArguments.from_settings(settings),
                                                         whisper.config.encoder_layers))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # a trained adapter's size of change: the scores move, the words mostly not
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    peft_model.save_pretrained(tmp_path / "adapter")
    version = f"{base.version}-lora001-test"
    merged = WhisperEngine(settings, resolved=replace(base, version=version, adapter=str(tmp_path / "adapter"),
                                                      base_version=base.version))
    shared = WhisperEngine(settings, resolved=base)
    audio = [clip("jfk_en.flac"), clip("dictee_fr.aiff")]
    before = shared.transcribe(audio)
    view = shared.with_adapter(version, str(tmp_path / "adapter"))
    adapted, expected = view.transcribe(audio), merged.transcribe(audio)
    after = shared.transcribe(audio)
    shared.clear_cache()
    assert [t.model_version for t in adapted] == [version] * 2 and after[0].model_version == base.version
    for a, m, b in zip(adapted, expected, shared.transcribe(audio)):
        assert a.text == m.text and a.language == m.language
        assert a.confidence == pytest.approx(m.confidence, abs=1e-4)
        assert a.uncertainty.mean_logprob == pytest.approx(m.uncertainty.mean_logprob, abs=1e-5)
        moved = sum(abs(getattr(a.uncertainty, k) - getattr(b.uncertainty, k))
                    for k in ("mean_logprob", "mean_entropy", "max_entropy"))
        assert moved > 1e-3  # the adapter is really on: 100 times what merged and shared differ by
    assert [(t.text, t.confidence) for t in shared.transcribe(audio)] == [(t.text, t.confidence) for t in before]
