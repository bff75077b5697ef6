"""Project languages: a project lists the languages its recordings are in, and the model predicts no other."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_backend.decoding import LanguagePosterior
from ml_backend.errors import ConfigurationError
from ml_backend.label_config import LabelConfigError, parse_label_config, restrict_languages
from ml_backend.transcription import TranscribeOptions

CONFIG = (Path(__file__).resolve().parents[1] / "label_config.xml").read_text()


def test_restricted_config_offers_only_the_project_languages():
    english = restrict_languages(CONFIG, ["en"])
    assert parse_label_config(english).language_values == {"en": "en"}
    assert "Listen, then correct the transcript" in english and "<!--" in english  # the rest survives
    pair = restrict_languages(CONFIG, ["de", "EN "])
    assert set(parse_label_config(pair).language_values) == {"en", "de"}
    with pytest.raises(LabelConfigError, match="xx"):
        restrict_languages(CONFIG, ["en", "xx"])


def test_options_for_a_project():
    assert TranscribeOptions.for_project({"en": "en"}) == TranscribeOptions(language="en")  # forced, no detection
    assert TranscribeOptions.for_project(["en", "de"]).languages == ("de", "en")
    assert TranscribeOptions.for_project([]) == TranscribeOptions()  # no language Choices: any language
    with pytest.raises(ConfigurationError):
        TranscribeOptions(languages=("en", "klingon"))


def test_detection_is_restricted_and_renormalized():
    posterior = LanguagePosterior({"zh": 0.5, "en": 0.3, "de": 0.1, "fr": 0.1}, no_speech_prob=0.0)
    assert posterior.best() == ("zh", 0.5)
    code, p = posterior.best({"en", "de"})
    assert code == "en" and p == pytest.approx(0.75)
    assert posterior.best({"xx"})[0] == "zh"  # nothing the model knows: unrestricted


@pytest.mark.slow
def test_a_project_of_one_language_never_predicts_another(engine, clip):
    french = clip("dictee_fr.aiff")
    assert engine.transcribe([french])[0].language == "fr"
    assert engine.transcribe([french], TranscribeOptions.for_project(["en"]))[0].language == "en"
    assert engine.transcribe([french], TranscribeOptions.for_project(["en", "de"]))[0].language in {"en", "de"}
