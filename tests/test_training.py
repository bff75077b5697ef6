"""Training pieces without Label Studio: target sequences, the frozen split, job recovery."""

from __future__ import annotations

import re
import socket
from dataclasses import replace

import numpy as np
import pytest

from ml_backend.ledger import Ledger
from ml_backend.splits import (
    HELDOUT,
    TRAIN,
    ahead_cutoff,
    ahead_share,
    confidence_of,
    heldout_by_hash,
    serving_score,
    split_position,
)
from training.dataset import Example, frozen_splits
from training.lora import LoraArguments, target_tokens, timestamped


@pytest.fixture(scope="module")
def whisper_tokens(settings):
    from transformers import WhisperTokenizer
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    from ml_backend.decoding import SpecialTokens
    from ml_backend.model_store import resolve_base

    tokenizer = WhisperTokenizer.from_pretrained(resolve_base(settings, "base").path)
    return tokenizer, SpecialTokens.from_tokenizer(tokenizer, list(LANGUAGES), True)


def test_target_sequence_has_language_task_and_timestamps(whisper_tokens):
    tokenizer, special = whisper_tokens
    example = Example(task=2, audio=np.zeros(16000 * 3, np.float32), text="Restart Zorvex now.", language="de")
    with_ts = target_tokens(tokenizer, special, example, timestamps=True)
    assert with_ts[:3] == [special.sot, special.languages["de"], special.transcribe]
    assert with_ts[3] == special.timestamp_begin and with_ts[-2] == special.timestamp_begin + 150  # 3.00 s
    assert with_ts[-1] == special.eot
    assert tokenizer.decode(with_ts[4:-2]).strip() == "Restart Zorvex now."
    plain = target_tokens(tokenizer, special, example, timestamps=False)
    assert plain[3] == special.no_timestamps and plain[-1] == special.eot


def test_timestamped_share_picks_that_share_of_consecutive_tasks():
    from ml_backend.errors import ConfigurationError
    from ml_backend.settings import Settings

    assert LoraArguments().timestamped_share == 1.0  # the engine decodes with timestamps
    assert [t for t in range(1, 9) if timestamped(t, 0.5)] == [2, 4, 6, 8]
    assert all(timestamped(t, 1.0) for t in range(50)) and not any(timestamped(t, 0.0) for t in range(50))
    assert LoraArguments.from_settings(Settings.from_env({"TRAIN_TIMESTAMPED_SHARE": "1"})).timestamped_share == 1.0
    for wrong in ("-0.1", "1.5", "half"):
        with pytest.raises(ConfigurationError, match="TRAIN_TIMESTAMPED_SHARE"):
            Settings.from_env({"TRAIN_TIMESTAMPED_SHARE": wrong})
    for share in (0.1, 0.25, 0.7):
        picked = sum(timestamped(t, share) for t in range(1, 1001))
        assert abs(picked - 1000 * share) <= 1
        assert abs(sum(timestamped(t, share) for t in range(1, 21)) - 20 * share) <= 1  # even in a short run


def test_split_is_deterministic_and_frozen(tmp_path):
    tasks = list(range(1, 401))
    first = {t: heldout_by_hash(5, t, 0.2) for t in tasks}
    assert first == {t: heldout_by_hash(5, t, 0.2) for t in tasks}
    assert 0.14 < sum(first.values()) / len(tasks) < 0.26
    ledger = Ledger(tmp_path / "l.db")
    splits = frozen_splits(ledger, 5, tasks[:200], 0.2)
    # the fraction changes later: what was held out stays held out, what was trained on stays train
    later = frozen_splits(ledger, 5, tasks, 0.5)
    assert all(later[t] == splits[t] for t in tasks[:200])
    assert {later[t] for t in tasks[200:]} == {HELDOUT, TRAIN}


def test_serving_score_puts_a_random_heldout_sample_first_and_the_rest_after_the_pool():
    rng = np.random.default_rng(0)
    tasks = {t: float(rng.uniform()) for t in range(1, 2001)}  # task → the model's confidence
    scores = {t: serving_score(c, 7, t, heldout_fraction=0.2, ahead=0.05) for t, c in tasks.items()}
    ahead = [t for t in tasks if split_position(7, t) < 0.05]
    rest = [t for t in tasks if 0.05 <= split_position(7, t) < 0.2]
    pool = [t for t in tasks if split_position(7, t) >= 0.2]
    assert 0.03 < len(ahead) / len(tasks) < 0.07 and all(heldout_by_hash(7, t, 0.2) for t in ahead + rest)
    order = sorted(tasks, key=scores.__getitem__)  # what Label Studio's uncertainty sampling serves
    assert set(order[:len(ahead)]) == set(ahead)
    assert set(order[len(ahead):len(ahead) + len(pool)]) == set(pool)
    assert [tasks[t] for t in order[len(ahead):len(ahead) + len(pool)]] == sorted(tasks[t] for t in pool)
    # the ahead sample is not the hardest slice: its confidences look like everyone's
    assert abs(np.mean([tasks[t] for t in ahead]) - np.mean(list(tasks.values()))) < 0.1
    assert all(0 <= x <= 1 for x in scores.values())  # what Label Studio accepts
    assert all(abs(confidence_of(round(scores[t], 9)) - tasks[t]) < 1e-5 for t in tasks)
    assert confidence_of(serving_score(0.3, None, 5, 0.2, 0.05)) == pytest.approx(0.3)  # no project: the pool


def test_a_small_project_serves_at_least_heldout_ahead_tasks_first():
    # large project: the share; small: the count; tiny: the whole held-out split, never more
    assert ahead_share(0.2, 0.05, 30, 10_000) == pytest.approx(0.05)
    assert ahead_share(0.2, 0.05, 30, 300) == pytest.approx(0.1)
    assert ahead_share(0.2, 0.05, 30, 100) == pytest.approx(0.2)
    assert ahead_share(0.2, 0.05, 30, None) == pytest.approx(0.05)  # size unknown (Label Studio down)
    assert ahead_share(0.2, 0.05, 0, 100) == pytest.approx(0.05)
    tasks = range(1, 301)
    ahead = ahead_share(0.2, 0.05, 30, len(tasks))
    first = [t for t in tasks if serving_score(0.99, 4, t, 0.2, ahead) < 0.001]  # the ahead band
    assert 20 <= len(first) <= 40 and all(heldout_by_hash(4, t, 0.2) for t in first)


def test_where_the_count_decides_exactly_that_many_tasks_are_served_ahead():
    listed: list[int] = []

    def ids(tasks):
        def task_ids():
            listed.append(len(tasks))
            return tasks
        return task_ids

    for project in range(1, 21):  # a share gives 30 tasks of 240 only on average; the cutoff gives 30 each time
        tasks = list(range(1000, 1240))
        cutoff = ahead_cutoff(project, len(tasks), ids(tasks), 0.2, 0.05, 30)
        first = [t for t in tasks if serving_score(0.99, project, t, 0.2, cutoff) < 0.001]
        assert len(first) == 30 and all(heldout_by_hash(project, t, 0.2) for t in first)
        lowest = sorted(tasks, key=lambda t: split_position(project, t))[:30]
        assert set(first) == set(lowest)  # by hash, not difficulty
    assert listed == [240] * 20
    # a large project keeps the share and is never listed; Label Studio silent: the share stands
    assert ahead_cutoff(1, 10_000, ids(list(range(10_000))), 0.2, 0.05, 30) == pytest.approx(0.05)
    assert listed == [240] * 20
    assert ahead_cutoff(1, 240, lambda: None, 0.2, 0.05, 30) == pytest.approx(0.125)
    # fewer held-out tasks than the count: all of the held-out split; never fewer than the share
    assert ahead_cutoff(1, 60, ids(list(range(60))), 0.2, 0.05, 30) == pytest.approx(0.2)
    assert ahead_cutoff(1, 240, ids(list(range(240))), 0.2, 0.05, 1) >= 0.05


def test_lora_arguments_come_from_settings(settings):
    s = replace(settings, lora_r=8, train_epochs=3, train_spec_augment=True)
    args = LoraArguments.from_settings(s, epochs=7, learning_rate=None)
    assert (args.r, args.epochs, args.learning_rate, args.spec_augment) == (8, 7, s.train_learning_rate, True)


def test_a_job_warm_starts_from_the_live_adapter_only_when_asked_and_there_is_one(settings):
    from training.pipeline import training_arguments

    job = {"epochs": 9, "max_steps": 0, "device": "cuda"}  # a job may not change where training runs
    assert training_arguments(settings, "/registry/v1/adapter", job).init_adapter is None  # TRAIN_WARM_START=0
    warm = replace(settings, train_warm_start=True)
    args = training_arguments(warm, "/registry/v1/adapter", job, seed=3)
    assert (args.init_adapter, args.epochs, args.max_steps, args.device, args.seed) == (
        "/registry/v1/adapter", 9, 0, settings.device, 3)
    assert training_arguments(warm, None).init_adapter is None  # the base serves: a fresh adapter


def test_recovery_requeues_a_job_whose_worker_died_then_fails_it(tmp_path, settings, monkeypatch):
    from loopscribe import jobs

    s = replace(settings, home=tmp_path, train_max_attempts=2)
    ledger = Ledger(s.ledger_url)
    job, _ = ledger.jobs.request(4, "cli")
    dead = f"{socket.gethostname()}:999999"  # no such pid
    ledger.jobs.claim(job.id, dead)
    sent = []
    assert jobs.recover_jobs(s, sent.append) == [(job.id, "queued")] and sent == [job.id]
    ledger.jobs.claim(job.id, dead)
    ledger.jobs.progress(job.id, stage="training", step=7, total_steps=80)
    assert jobs.recover_jobs(s, sent.append) == [(job.id, "failed")]
    assert "stopped during step 7/80 (attempt 2 of 2)" in ledger.jobs.get(job.id).reason
    alive = ledger.jobs.request(4, "cli")[0]
    ledger.jobs.claim(alive.id, jobs.worker_id())  # this process: alive, left alone
    assert jobs.recover_jobs(s, sent.append, on_start=True) == []


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("encoder", [False, True])
def test_two_process_training_under_accelerate_launch_gives_the_same_kind_of_adapter(settings, tmp_path, clip,
                                                                                     transcripts, encoder):
    """TRAIN_PROCESSES=2 on a CPU: `accelerate launch` starts two processes joined over gloo; each trains on its half
    of every batch, the steps are those of one process, both end with the same adapter (checked by the trainer:
    with the encoder adapted too, it runs outside DDP's forward), and the main process saves one that serves."""
    from ml_backend.engine import WhisperEngine
    from ml_backend.model_store import resolve_base
    from training import distributed

    names = ["jfk_en.flac", "one_two_three_en.wav", "comfyui_en.mp3", "dictee_fr.aiff"]
    examples = [Example(task=i, audio=clip(n)[: 30 * 16000], text=transcripts[n]["text"],
                        language=transcripts[n]["language"]) for i, n in enumerate(names * 2)]
    base = resolve_base(settings, "base")
    args = LoraArguments.from_settings(settings, epochs=1, batch_size=4, device="cpu", encoder=encoder)
    steps: list[int] = []
    result = distributed.train(base.path, examples, args, tmp_path / "adapter", processes=2,
                               on_step=lambda p: steps.append(p.step), progress=False)
    assert result.processes == 2 and result.steps == 2 == len(examples) // 4 and steps == [1, 2]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and result.final_loss > 0
    adapted = WhisperEngine(replace(settings, dtype="float32"),
                            resolved=replace(base, version="two-process", adapter=str(tmp_path / "adapter")))
    text = adapted.transcribe([clip("jfk_en.flac")])[0].text
    assert "country" in text.lower(), text


def test_replicas_that_ended_with_different_adapters_are_an_error():
    import torch

    from training.lora import check_replicas_agree

    class Gather:
        device = "cpu"

        def __init__(self, drift: float):
            self.drift = drift

        def gather(self, value):
            return torch.cat([value, value + self.drift])

    model = torch.nn.Linear(2, 1)
    check_replicas_agree(Gather(0.0), model)
    with pytest.raises(RuntimeError, match="different adapters"):
        check_replicas_agree(Gather(1e-3), model)


@pytest.fixture(scope="module")
def base_whisper(settings):
    from ml_backend.model_store import resolve_base
    from ml_backend.whisper import load_whisper

    base = resolve_base(settings, "base")
    return base.path, load_whisper(base.path).model.eval()


def test_the_encoder_resumed_from_a_cached_layer_input_is_the_encoder(base_whisper):
    """The top-layers recipe caches the input of the first adapted encoder layer and runs only the layers above it:
    resumed from any layer, that must be exactly the encoder's own output."""
    import torch

    from training.lora import encoder_layer_input, run_encoder_layers

    _, model = base_whisper
    encoder = model.model.encoder
    features = torch.randn(2, model.config.num_mel_bins, 2 * model.config.max_source_positions,
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = encoder(features).last_hidden_state
        for start in (0, 4, len(encoder.layers) - 1):
            resumed = run_encoder_layers(encoder, encoder_layer_input(encoder, features, start), start)
            assert torch.allclose(resumed, whole, atol=1e-5), start
        assert torch.equal(encoder_layer_input(encoder, features, len(encoder.layers)), whole)


@pytest.mark.parametrize(("encoder", "top", "expected"), [(False, 0, set()), (True, 0, {0, 1, 2, 3, 4, 5}),
                                                           (True, 2, {4, 5}), (True, 9, {0, 1, 2, 3, 4, 5})])
def test_lora_adapts_the_decoder_and_the_chosen_encoder_layers(settings, encoder, top, expected):
    from training.lora import adapted_encoder_layers, lora_config

    args = replace(LoraArguments.from_settings(settings), encoder=encoder, encoder_layers=top)
    assert set(adapted_encoder_layers(args, 6)) == expected
    pattern = lora_config(args, 6).target_modules
    names = [f"model.encoder.layers.{i}.self_attn.{m}" for i in range(6) for m in ("q_proj", "k_proj", "v_proj")]
    names += ["model.decoder.layers.0.self_attn.q_proj", "model.decoder.layers.5.encoder_attn.v_proj"]
    matched = {n for n in names if re.fullmatch(pattern, n)}
    assert {n for n in matched if ".decoder." in n} == set(names[-2:])
    assert {int(n.split(".")[3]) for n in matched if ".encoder." in n} == expected
    assert not any(n.endswith("k_proj") for n in matched)
    with pytest.raises(ValueError, match="encoder_layers"):
        adapted_encoder_layers(replace(args, encoder=True, encoder_layers=-1), 6)


def test_training_the_top_encoder_layers_changes_only_those_and_the_decoder(settings, tmp_path, clip, transcripts,
                                                                            base_whisper):
    """One real step with LORA_ENCODER_LAYERS=2 on the bundled base: the saved adapter has updates (LoRA B leaves
    zero) in encoder layers 4 and 5 and in the decoder, and none anywhere else."""
    from safetensors.torch import load_file

    from training.lora import train_lora

    path, _ = base_whisper
    names = ["jfk_en.flac", "one_two_three_en.wav"]
    examples = [Example(task=i, audio=clip(n)[: 30 * 16000], text=transcripts[n]["text"],
                        language=transcripts[n]["language"]) for i, n in enumerate(names)]
    args = LoraArguments.from_settings(settings, epochs=1, batch_size=2, device="cpu", encoder=True,
                                       encoder_layers=2)
    result = train_lora(path, examples, args, tmp_path / "adapter", progress=False)
    assert result.steps == 1 and result.final_loss > 0
    updated = {k for k, v in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).items()
               if ".lora_B." in k and v.abs().sum() > 0}
    encoder_layers = {int(k.split("encoder.layers.")[1].split(".")[0]) for k in updated if ".encoder.layers." in k}
    assert encoder_layers == {4, 5} and any(".decoder." in k for k in updated)


def test_spec_augment_masks_bands_and_spans_inside_the_speech_only():
    import torch

    from training.lora import FREQUENCY_MASK_BINS, MASKS, TIME_MASK_SHARE, spec_augment

    features = torch.rand(3, 80, 3000) + 1  # nothing is 0 before masking
    frames = [400, 3000, 12]  # the last: too short for a time mask (5 % of 12 frames is no whole frame)
    masked = spec_augment(features, frames, torch.Generator().manual_seed(0))
    assert torch.all(features > 0), "the input is left as it was"
    for row, speech in enumerate(frames):
        zero = masked[row] == 0
        bands = zero.all(dim=1)  # mel bins masked over all frames
        spans = zero.all(dim=0)  # frames masked over all bins
        assert bands.sum() <= MASKS * FREQUENCY_MASK_BINS
        assert spans.sum() <= MASKS * int(speech * TIME_MASK_SHARE)
        assert not spans[speech:].any(), "time masks stay inside the utterance, not its padding"
        assert torch.equal(zero, bands[:, None] | spans[None, :]), "nothing else is touched"
    again = spec_augment(features, frames, torch.Generator().manual_seed(0))
    other = spec_augment(features, frames, torch.Generator().manual_seed(1))
    assert torch.equal(masked, again) and not torch.equal(masked, other)


def test_speed_perturbation_plays_an_utterance_faster_and_higher():
    """At 1.1 times the speed an utterance is 1/1.1 as long and a 440 Hz tone in it is at 484 Hz; at 0.9, 1/0.9 as
    long and 396 Hz; at 1 it is the same utterance. The setting takes a share below one half."""
    import numpy as np

    from ml_backend.errors import ConfigurationError
    from ml_backend.settings import Settings
    from training.lora import at_speed

    tone = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32)
    example = Example(task=2, audio=tone, text="a tone", language="en")
    assert at_speed(example, 1.0) is example
    for factor in (1.1, 0.9):
        played = at_speed(example, factor)
        assert (played.task, played.text, played.language) == (2, "a tone", "en")
        assert played.duration == pytest.approx(1 / factor, abs=2e-4)  # the end timestamp a target gets
        spectrum = np.abs(np.fft.rfft(played.audio))
        peak = np.argmax(spectrum) * 16000 / played.audio.size
        assert peak == pytest.approx(440 * factor, abs=2)
    assert Settings.from_env({}).train_speed_perturb == 0
    assert Settings.from_env({"TRAIN_SPEED_PERTURB": "0.1"}).train_speed_perturb == pytest.approx(0.1)
    for wrong in ("0.5", "-0.1", "fast"):
        with pytest.raises(ConfigurationError, match="TRAIN_SPEED_PERTURB"):
            Settings.from_env({"TRAIN_SPEED_PERTURB": wrong})


def test_training_with_augmentation_sees_other_features(settings, tmp_path, clip, transcripts, base_whisper):
    """One real step over the whole encoder, with and without TRAIN_SPEC_AUGMENT (or TRAIN_SPEED_PERTURB), from the
    same seed: the masked (or replayed) features give another loss; with only the top encoder layers trained the
    setting is not applied (their input is cached), so the loss is the plain one."""
    from training.lora import train_lora

    path, _ = base_whisper
    names = ["jfk_en.flac", "one_two_three_en.wav"]
    examples = [Example(task=i, audio=clip(n)[: 30 * 16000], text=transcripts[n]["text"],
                        language=transcripts[n]["language"]) for i, n in enumerate(names)]
    args = LoraArguments.from_settings(settings, epochs=1, batch_size=2, device="cpu", encoder=True, encoder_layers=0)
    assert args.spec_augment is False  # off unless TRAIN_SPEC_AUGMENT says so

    def loss(**changes) -> float:
        result = train_lora(path, examples, replace(args, **changes), tmp_path / str(changes), progress=False)
        assert result.steps == 1
        return result.final_loss

    plain, augmented = loss(), loss(spec_augment=True)
    assert augmented != pytest.approx(plain, rel=1e-4)
    assert loss(encoder_layers=2, spec_augment=True) == pytest.approx(loss(encoder_layers=2), rel=1e-4)
    # TRAIN_SPEED_PERTURB the same way: another speed, another loss, only where the whole encoder trains
    assert args.speed_perturb == 0
    assert loss(speed_perturb=0.1) != pytest.approx(plain, rel=1e-4)
    assert loss(encoder_layers=2, speed_perturb=0.1) == pytest.approx(loss(encoder_layers=2), rel=1e-4)
    with pytest.raises(ValueError, match="speed_perturb"):
        loss(speed_perturb=0.5)


def test_a_step_limit_ends_training_mid_epoch_and_sizes_the_schedule(settings, tmp_path, clip, transcripts,
                                                                     base_whisper):
    """TRAIN_MAX_STEPS bounds a job however many corrections the project has: 4 utterances, batch 1, 3 epochs
    would be 12 steps; with a limit of 5 training stops after the first step of the second epoch, and the
    progress (and so the learning-rate schedule) counts to 5, not 12."""
    from ml_backend.errors import ConfigurationError
    from ml_backend.settings import Settings
    from training.lora import train_lora

    assert Settings.from_env({"TRAIN_MAX_STEPS": "40"}).train_max_steps == 40
    with pytest.raises(ConfigurationError, match="TRAIN_MAX_STEPS"):
        Settings.from_env({"TRAIN_MAX_STEPS": "-1"})
    path, _ = base_whisper
    names = ["jfk_en.flac", "one_two_three_en.wav"]
    examples = [Example(task=i, audio=clip(n)[: 30 * 16000], text=transcripts[n]["text"],
                        language=transcripts[n]["language"]) for i, n in enumerate(names * 2)]
    args = LoraArguments.from_settings(replace(settings, train_max_steps=5), epochs=3, batch_size=1, device="cpu",
                                       encoder=False)
    assert args.max_steps == 5
    seen: list[tuple[int, int]] = []
    result = train_lora(path, examples, args, tmp_path / "adapter", progress=False,
                        on_step=lambda p: seen.append((p.step, p.total_steps)))
    assert result.steps == 5 and seen == [(step, 5) for step in range(1, 6)]


def test_a_warm_start_begins_as_the_saved_adapter_and_refuses_one_that_does_not_fit(settings, tmp_path, clip,
                                                                                    transcripts, base_whisper):
    """TRAIN_WARM_START: at learning rate 0 a warm-started job saves exactly the adapter it began as (a trained,
    non-zero one), a fresh one saves LoRA's zero update; an adapter of another rank is not loaded."""
    from safetensors.torch import load_file

    from training.lora import train_lora

    path, _ = base_whisper
    name = "jfk_en.flac"
    examples = [Example(task=0, audio=clip(name)[: 10 * 16000], text=transcripts[name]["text"],
                        language=transcripts[name]["language"])]
    args = LoraArguments.from_settings(settings, epochs=1, batch_size=1, device="cpu", encoder=False)

    def weights(adapter) -> dict:
        return load_file(str(adapter / "adapter_model.safetensors"))

    trained = train_lora(path, examples, args, tmp_path / "trained", progress=False)
    assert not trained.warm_started and any(t.abs().sum() > 0 for k, t in weights(trained.adapter_dir).items()
                                            if ".lora_B." in k)
    still = replace(args, learning_rate=0.0)
    warm = train_lora(path, examples, replace(still, init_adapter=str(trained.adapter_dir)), tmp_path / "warm",
                      progress=False)
    assert warm.warm_started
    before, after = weights(trained.adapter_dir), weights(warm.adapter_dir)
    assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)
    fresh = train_lora(path, examples, still, tmp_path / "fresh", progress=False)
    assert all(t.abs().sum() == 0 for k, t in weights(fresh.adapter_dir).items() if ".lora_B." in k)
    other_rank = replace(still, r=8, alpha=16, init_adapter=str(trained.adapter_dir))
    assert not train_lora(path, examples, other_rank, tmp_path / "other", progress=False).warm_started


def test_the_encoder_layer_count_is_checked_when_read():
    from ml_backend.errors import ConfigurationError
    from ml_backend.settings import Settings

    for bad in ("-1", "three"):
        with pytest.raises(ConfigurationError, match="LORA_ENCODER_LAYERS"):
            Settings.from_env({"LORA_ENCODER_LAYERS": bad})
    assert Settings.from_env({"LORA_ENCODER_LAYERS": "3"}).lora_encoder_layers == 3
