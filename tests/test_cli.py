"""The `loopscribe` command as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loopscribe.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_transcribe_json_lines(shared_audio, tmp_path, engine):
    corrupt = tmp_path / "broken.wav"
    corrupt.write_bytes(b"RIFF....WAVEjunk")
    proc = run_cli("transcribe", "--json", str(shared_audio / "jfk_en.flac"), str(corrupt),
                   str(shared_audio / "dictee_fr.aiff"))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    by_file = {rec["file"]: rec for rec in lines}
    jfk = by_file[str(shared_audio / "jfk_en.flac")]
    assert {"file", "text", "language", "language_probability", "confidence", "segments"} <= set(jfk)
    assert jfk["language"] == "en" and "fellow Americans" in jfk["text"]
    assert all({"start", "end", "text"} <= set(s) for s in jfk["segments"])
    assert by_file[str(shared_audio / "dictee_fr.aiff")]["language"] == "fr"
    assert "error" in by_file[str(corrupt)]
    assert "broken.wav" in proc.stderr


@pytest.mark.slow
def test_transcribe_plain_with_options(shared_audio, engine):
    proc = run_cli("transcribe", "--task", "translate", "--language", "fr", str(shared_audio / "dictee_fr.aiff"))
    assert proc.returncode == 0, proc.stderr
    file, language, probability, confidence, text = proc.stdout.strip().split("\t")
    assert language == "fr" and 0 <= float(confidence) <= 1 and text


def test_unknown_language_is_a_clean_error(shared_audio):
    proc = run_cli("transcribe", "--language", "xx", str(shared_audio / "jfk_en.flac"))
    assert proc.returncode == 2 and "unknown language" in proc.stderr and "Traceback" not in proc.stderr


def test_model_list(bundled_base):
    proc = run_cli("model", "list")
    assert proc.returncode == 0
    assert "base" in proc.stdout and bundled_base.version in proc.stdout and "tiny.en" in proc.stdout


def test_readme_configuration_table_is_the_generated_one():
    """`loopscribe config --markdown` is pasted into the README; a new or changed setting must be documented."""
    from loopscribe.cli import render_settings

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert render_settings("markdown") in readme


def test_settings_parse_and_reject_bad_values():
    from ml_backend.settings import Settings

    s = Settings.from_env({"LORA_TARGET_MODULES": "q_proj, k_proj,", "LORA_ENCODER": "yes",
                           "LABEL_STUDIO_URL": "http://ls:8080/", "TRAIN_EPOCHS": ""})
    assert s.lora_target_modules == ("q_proj", "k_proj") and s.lora_encoder and s.label_studio_url == "http://ls:8080"
    assert s.train_epochs == Settings().train_epochs  # empty keeps the default
    with pytest.raises(ValueError, match="TRAIN_EPOCHS='five'"):
        Settings.from_env({"TRAIN_EPOCHS": "five"})
    assert "secret" not in repr(Settings.from_env({"WEBHOOK_SECRET": "secret", "REDIS_URL": "redis://:secret@r"}))


def test_label_studio_down_is_one_clear_line_and_writes_nothing(tmp_path):
    out = tmp_path / "export"
    env = {"PATH": "/usr/bin:/bin", "LOOPSCRIBE_HOME": str(tmp_path / "home"), "LABEL_STUDIO_URL": "http://127.0.0.1:9",
           "LABEL_STUDIO_API_KEY": "x" * 40, "LOOPSCRIBE_ENV_FILE": str(tmp_path / "none.env")}
    done = subprocess.run([sys.executable, "-m", "loopscribe.cli", "export", "--project", "1", "--format", "jsonl",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "Label Studio (http://127.0.0.1:9)" in done.stderr and "ConnectError" in done.stderr
    assert not out.exists()


def test_bench_engine_offers_every_attention_the_decoder_step_has():
    from loopscribe.cli import build_parser
    from ml_backend.decode_step import ATTENTION

    for kind in ATTENTION:
        assert build_parser().parse_args(["bench", "engine", "--attention", kind]).attention == [kind]


def test_train_passes_its_overrides_to_the_job(tmp_path, settings, monkeypatch):
    """`loopscribe train --max-steps 0 --epochs 5` queues a job whose params lift the step limit and set the
    epochs; the training round reads exactly those into its LoRA arguments."""
    from dataclasses import replace

    from loopscribe import jobs
    from loopscribe.cli import build_parser
    from ml_backend.ledger import Ledger
    from training.lora import LoraArguments

    queued: list[int] = []
    monkeypatch.setattr(jobs, "enqueue_training_job", queued.append)
    s = replace(settings, home=tmp_path)
    args = build_parser().parse_args(["train", "--project", "7", "--max-steps", "0", "--epochs", "5"])
    assert args.func(args, s) == 0
    job = Ledger(s.ledger_url).jobs.get(queued[0])
    assert job is not None and job.project == 7 and job.params == {"epochs": 5, "max_steps": 0}
    lora = LoraArguments.from_settings(s, **job.params)
    assert (lora.epochs, lora.max_steps) == (5, 0)
