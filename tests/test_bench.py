"""Benchmark arithmetic (the benchmarks themselves run against the live stack: README, Benchmarks)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from loopscribe.bench.loop import Curve, gate_agreement
from loopscribe.bench.uncertainty import score_signals
from ml_backend.settings import Settings
from ml_backend.text import normalize


def test_corrections_to_reach_interpolates_the_first_crossing():
    curve = Curve("entropy", [(0, 0.6), (8, 0.4), (16, 0.2), (24, 0.3)])
    assert curve.corrections_to_reach(0.6) == 0
    assert curve.corrections_to_reach(0.3) == 12  # halfway between 8 (0.4) and 16 (0.2)
    assert curve.corrections_to_reach(0.2) == 16
    assert curve.corrections_to_reach(0.1) is None


def _t(entropy: float, logprob: float, confidence: float):
    u = SimpleNamespace(mean_entropy=entropy, max_entropy=entropy * 2, mean_logprob=logprob, no_speech_prob=0.0)
    return SimpleNamespace(confidence=confidence, uncertainty=u)


def test_a_signal_that_orders_errors_perfectly_scores_one():
    errors = [0.0, 0.0, 0.2, 0.5, 1.0]
    ts = [_t(e + 0.1, -e, 1 - e) for e in [0.0, 0.01, 0.2, 0.5, 1.0]]
    scores = {s.signal: s for s in score_signals(ts, errors)}
    for name in ("1 - confidence (served)", "mean entropy", "-mean logprob"):
        assert math.isclose(scores[name].auroc, 1.0) and scores[name].spearman > 0.95
    assert math.isnan(scores["no-speech prob"].spearman)  # constant: no ranking at all


def test_a_reversed_signal_scores_below_chance():
    errors = [0.0, 0.3, 0.6, 1.0]
    ts = [_t(1 - e, e - 1, e) for e in errors]
    scores = {s.signal: s for s in score_signals(ts, errors)}
    assert scores["mean entropy"].spearman < -0.9 and scores["mean entropy"].auroc == 0.0


def test_bench_train_times_steps_of_a_local_random_model(tmp_path, settings, capsys):
    """`bench train --shape tiny`: a random tiny Whisper written to a local directory, trained by the product code."""
    from loopscribe.cli import build_parser

    out = tmp_path / "train.json"
    args = build_parser().parse_args(["bench", "train", "--shape", "tiny", "--steps", "3", "--batch-size", "2",
                                      "--examples", "2", "--quiet", "--json", str(out)])
    assert args.func(args, settings) == 0
    (row,) = json.loads(out.read_text())
    assert row["model"] == "tiny (random weights)" and 36 < row["parameters_m"] < 40  # published tiny: 39 M
    assert row["steps"] == 3 and row["trainable_m"] > 0
    assert row["later_s_per_step"] > 0 and row["peak_memory_mb"] > 0
    assert "tiny (random weights)" in capsys.readouterr().out


def test_corpus_split_is_speaker_disjoint_and_seeded(tmp_path):
    from loopscribe.bench.loop import corpus_split

    meta, speakers = {}, {}
    for spk in range(10):
        for utt in range(5):
            name = f"s{spk}_{utt}.wav"
            (tmp_path / name).write_bytes(b"")
            meta[name], speakers[name] = {"text": f"utterance {utt}", "language": "en"}, f"spk{spk}"
    (tmp_path / "transcripts.json").write_text(json.dumps(meta))
    (tmp_path / "speakers.json").write_text(json.dumps(speakers))
    pool, held = corpus_split(tmp_path, seed=1, pool_size=30, heldout_size=8)
    assert len(pool) == 30 and len(held) == 8
    assert not {speakers[c.path.name] for c in pool} & {speakers[c.path.name] for c in held}
    assert corpus_split(tmp_path, 1, 30, 8) == (pool, held)
    assert corpus_split(tmp_path, 2, 30, 8) != (pool, held)


def test_mean_interval_over_seeds():
    from loopscribe.bench.loop import mean_interval

    mean, lo, hi = mean_interval([0.30, 0.32, 0.34])
    assert mean == 0.32 and lo < 0.30 and hi > 0.34  # t(2) is wide: three seeds say little
    assert mean_interval([0.5]) == (0.5, 0.5, 0.5)


def test_mean_relative_drop_skips_runs_without_a_first_reading():
    from loopscribe.bench.loop import mean_relative_drop

    assert mean_relative_drop([(0.4, 0.3), (0.0, 0.1)]) == pytest.approx((0.25, 0.25, 0.25))
    mean, lo, hi = mean_relative_drop([(0.4, 0.3), (0.5, 0.25)])
    assert mean == pytest.approx(0.375) and lo < mean < hi
    assert mean_relative_drop([(0.0, 0.1)]) is None and mean_relative_drop([]) is None


def test_the_reserved_test_split_is_never_written(tmp_path):
    import pytest

    from loopscribe.bench.corpus import prepare_speechocean762

    with pytest.raises(SystemExit, match="reserved"):
        prepare_speechocean762(tmp_path, tmp_path / "out", split="test")


def test_corpus_prompts_become_what_an_annotator_would_type():
    from loopscribe.bench.corpus import sentence_case

    assert sentence_case("WE CALL IT BEAR") == "We call it bear"
    assert sentence_case("I'M SURE I CAN") == "I'm sure I can"


def test_summary_of_several_seeds(capsys):
    from loopscribe.bench.loop import Curve, summarize

    def run(strategy, seed, live, cands, decisions, forced, independent=None):
        return Curve(strategy, [(8 * i, e) for i, e in enumerate(live)], cands, seed=seed, decisions=decisions,
                     forced=forced, independent=independent or decisions, gate_items=[2, 5])

    curves = [run("entropy", 0, [0.5, 0.4, 0.3], [0.4, 0.3], ["promoted"] * 2, (0.45, 0.3)),
              run("random", 0, [0.5, 0.5, 0.45], [0.55, 0.45], ["rejected", "promoted"], (0.45, 0.42)),
              run("entropy", 1, [0.4, 0.35, 0.3], [0.35, 0.3], ["promoted"] * 2, (0.4, 0.3), ["promoted", "rejected"]),
              run("random", 1, [0.4, 0.4, 0.35], [0.42, 0.35], ["inconclusive", "promoted"], (0.4, 0.36),
                  ["promoted", "promoted"])]
    summary = summarize(curves, [0, 1], None, "en")
    out = capsys.readouterr().out
    assert summary["random_final_error"] == 0.4  # entropy crosses 0.4 between 0 (0.45) and 8 (0.375):
    assert summary["entropy_corrections_to_match"] == pytest.approx(16 / 3)
    paired = summary["paired_difference"]["entropy"]  # same seed: (0.4 − 0.5, 0.35 − 0.4), (0.3 − 0.45, 0.3 − 0.35)
    assert [n for n, _, _ in paired] == [8, 16]
    assert paired[0][1][0] == pytest.approx(-0.075) and paired[1][1][0] == pytest.approx(-0.1)
    assert paired[0][2][0] == pytest.approx((-0.15 - 0.07) / 2)  # candidates: 0.4 − 0.55, 0.35 − 0.42
    assert "entropy − random on the same seed's pool" in out
    assert "entropy: 4 promoted" in out and "1 inconclusive" in out
    agreement = summary["gate_agreement"]  # one wrong promotion (entropy seed 1), one missed (random seed 1)
    assert (agreement["decisions"], agreement["agree"]) == (8, 6)
    assert (agreement["promoted_but_not_better"], agreement["missed"]) == (1, 1) and "6/8 agree" in out
    assert agreement["held_out_evidence_alone"]["decisions"] == 0 and "evidence alone" not in out
    curves[0].evidence = [("inconclusive", "promoted"), ("promoted", "promoted")]
    alone = summarize(curves, [0, 1], None, "en")["gate_agreement"]["held_out_evidence_alone"]
    assert (alone["decisions"], alone["agree"], alone["missed"]) == (2, 1, 1)
    assert "on held-out evidence alone (no general-speech check): 1/2 agree" in capsys.readouterr().out
    assert summary["forced_relative_drop"]["entropy"][0] > summary["forced_relative_drop"]["random"][0]
    assert "last_candidate_forced_relative_drop" not in summary  # no candidate was scored with the language forced
    curves[0].candidates_forced, curves[2].candidates_forced = [0.35, 0.36], [0.3, 0.2]  # vs forced 0.45 and 0.4
    again = summarize(curves, [0, 1], None, "en")
    assert again["last_candidate_forced_relative_drop"]["entropy"][0] == pytest.approx((0.2 + 0.5) / 2)
    assert "last candidate, language forced 35.0%" in capsys.readouterr().out
    assert "forced_greedy_relative_drop" not in again  # no model was read greedily
    curves[0].forced_greedy, curves[2].forced_greedy = (0.4, 0.3), (0.5, 0.3)
    greedy = summarize(curves, [0, 1], None, "en")["forced_greedy_relative_drop"]
    assert greedy["entropy"][0] == pytest.approx((0.25 + 0.4) / 2) and "random" not in greedy
    assert "(greedy, no fallback draws: 32.5%" in capsys.readouterr().out
    curves[0].general, curves[2].general = [(0.05, 0.06), (0.06, 0.052)], [(0.05, 0.05), (0.05, 0.054)]
    curves[0].wrong_language, curves[2].wrong_language = [3, 1, 0], [2, 2, 1]
    again = summarize(curves, [0, 1], None, "en", general_margin=0.005)
    assert again["general_speech_change"]["entropy"][0] == pytest.approx((0.002 + 0.004) / 2)
    out = capsys.readouterr().out
    assert "1 of 4 candidates more than 0.005 worse" in out and "another language: 5 → 1" in out
    from loopscribe.bench.loop import ShrunkRound  # the gate shrank seed 0's second adapter: both sides reported

    curves[0].retried, curves[0].strengths = [False, True], [1.0, 0.5]
    curves[0].shrunk = [ShrunkRound(2, 0.5, 0.3, 0.28, (0.06, 0.052), 0.07)]
    again = summarize(curves, [0, 1], None, "en", general_margin=0.005)
    assert again["curves"][0]["shrunk"][0]["error_as_trained"] == 0.28
    assert ("entropy seed 0 round 2: large set 0.300 at strength 0.5, 0.280 as trained; general speech: live 0.060, "
            "shrunk 0.052, as trained 0.070") in capsys.readouterr().out
    flat = [run(s, 0, [0.4, 0.4], [0.5], ["rejected"], None) for s in ("entropy", "random")]
    assert summarize(flat, [0], None, None)["entropy_corrections_to_match"] is None
    assert "not measurable" in capsys.readouterr().out


def test_gate_power_grows_with_the_gates_sample_and_is_zero_without_a_difference():
    from loopscribe.bench.loop import gate_power
    from ml_backend.settings import Settings

    settings = Settings(promote_min_gain=0.0, promote_confidence=0.95)
    live = [(3, 10)] * 60  # 30 % on every utterance; the candidate fixes 1 error on 24 of 60, adds 1 on 6
    candidate = [(2, 10)] * 24 + [(4, 10)] * 6 + [(3, 10)] * 30
    small, large = gate_power(live, candidate, 8, settings, 0), gate_power(live, candidate, 60, settings, 0)
    assert small is not None and large is not None
    assert small < 0.9 and large == 1.0 and small < gate_power(live, candidate, 30, settings, 0)
    assert gate_power(live, live, 30, settings, 0) == 0.0  # no difference: never promoted
    assert gate_power(live, candidate, 61, settings, 0) is None and gate_power(live, candidate, 0, settings, 0) is None
    curve = Curve("entropy", [(0, 0.3), (8, 0.3)], [0.27], decisions=["inconclusive"], independent=["promoted"],
                  gate_items=[8], gate_power=[small])
    assert gate_agreement([curve])["mean_power"] == small


def test_diverse_picks_serve_the_gate_sample_then_one_clip_per_cluster():
    import numpy as np

    from loopscribe.bench.loop import diverse_picks

    # tasks 1-2: the gate sample (ahead-band scores); 10-15 three tight clusters of two (a, b, c);
    # 20: confident, never a candidate
    directions = {"a": [1.0, 0.0, 0.0], "b": [0.0, 1.0, 0.0], "c": [0.0, 0.0, 1.0]}
    cluster = {10: "a", 11: "a", 12: "b", 13: "b", 14: "c", 15: "c", 1: "a", 2: "b", 20: "c"}
    rng = np.random.default_rng(0)
    embeddings = {t: np.array(directions[c]) + rng.normal(0, 0.01, 3) for t, c in cluster.items()}
    scores = {1: 0.0005, 2: 0.0001, 10: 0.10, 11: 0.11, 12: 0.12, 13: 0.13, 14: 0.14, 15: 0.15, 20: 0.9}
    unlabeled = sorted(scores)
    picks = diverse_picks(unlabeled, scores, embeddings, 5, seed=0)
    assert picks[:2] == [2, 1]  # the gate sample (scores in the ahead band) first, as /next serves it
    assert picks[2:] == [10, 12, 14]  # the least confident of each cluster, not 10, 11, 12 (a, a, b)
    assert diverse_picks(unlabeled, scores, embeddings, 1, seed=0) == [2]
    assert diverse_picks([10, 11], scores, embeddings, 5, seed=0) == [10, 11]  # fewer than k left


def test_skip_picks_serve_the_gate_sample_then_pass_over_the_least_confident():
    from loopscribe.bench.loop import skip_picks

    # 1-2: the gate sample (ahead band); 10-19: ranked pool tasks, 10 the least confident
    scores = {1: 0.0005, 2: 0.0001} | {t: 0.01 * t for t in range(10, 20)}
    unlabeled = sorted(scores)
    assert skip_picks(unlabeled, scores, 5, share=0.2) == [2, 1, 12, 13, 14]  # 10 and 11: the bottom 20 %
    assert skip_picks(unlabeled, scores, 12, share=0.2) == [2, 1, *range(12, 20), 10, 11]  # skipped ones come last
    assert skip_picks(unlabeled, scores, 1, share=0.2) == [2]
    assert skip_picks(unlabeled, scores, 3, share=0.0) == [2, 1, 10]  # no share: /next's own order


@pytest.mark.slow
def test_bench_adapters_measures_both_strategies_and_they_agree(tmp_path, settings):
    """`bench adapters`: each configuration in its own process, on the bundled base with real clips."""
    from loopscribe.cli import build_parser

    out = tmp_path / "adapters.json"
    args = build_parser().parse_args(["bench", "adapters", "--adapters", "1,2", "--clips", "2", "--batches", "2",
                                      "--json", str(out)])
    assert args.func(args, settings) == 0
    rows = json.loads(out.read_text())
    assert [(r["strategy"], r["adapters"]) for r in rows] == [("merged", 1), ("shared", 1), ("merged", 2),
                                                              ("shared", 2)]
    assert all(r["speed"] > 0 and r["resident_mb"] > 0 and r["peak_mb"] >= r["resident_mb"] for r in rows)
    merged, shared = rows[2], rows[3]
    # same adapters, same transcripts up to punctuation: merging an encoder adapter into bf16 weights rounds them,
    # so the unmerged (shared) path may differ in the last digits and, rarely, in a full stop
    assert len(merged["texts"]) == 2 and [[normalize(t) for t in a] for a in merged["texts"]] == [
        [normalize(t) for t in a] for a in shared["texts"]]
    assert merged["resident_mb"] > rows[0]["resident_mb"]  # a second merged model costs a second model


def test_bench_ledger_counts_each_annotation_once(capsys):
    import argparse

    from loopscribe.bench.ledger import bench_ledger, deliveries

    events = deliveries(5, project=3)
    assert len(events) == 30 and len({e["annotation"]["id"] for e in events}) == 5
    args = argparse.Namespace(database_url=None, threads=[1, 3], annotations=20)
    assert bench_ledger(args, None) == 0
    out = capsys.readouterr().out
    assert out.count("sqlite") == 2 and "yes" in out and "NO" not in out


def test_bench_attention_times_every_form_of_the_cross_attention(tmp_path, settings, capsys):
    """`bench engine --shape base --attention-only`: every form at the decoding shape, each as exact as float32."""
    from loopscribe.cli import build_parser
    from ml_backend.decode_step import ATTENTION

    out = tmp_path / "attention.json"
    args = build_parser().parse_args(["bench", "engine", "--shape", "base", "--attention-only", "--slots", "2",
                                      "--repeats", "2", "--json", str(out)])
    assert args.func(args, settings) == 0
    rows = json.loads(out.read_text())
    assert [r["form"] for r in rows] == list(ATTENTION)  # on a CPU: no fused-kernel rows, nothing marked serving
    assert all(r["ms"] > 0 and r["gb_per_s"] > 0 and r["max_diff"] < 1e-4 for r in rows)
    assert "cross-attention of 2 rows x 8 heads x 1500 frames x 64" in capsys.readouterr().out


def test_a_recipe_names_the_lora_arguments_it_changes_and_refuses_others():
    import argparse

    from loopscribe.bench.recipe import parse_recipe

    recipe = parse_recipe("attention:target_modules=q_proj+k_proj+v_proj;learning_rate=2e-3;encoder=0;r=8")
    assert recipe.name == "attention"
    assert recipe.overrides == {"target_modules": ("q_proj", "k_proj", "v_proj"), "learning_rate": 0.002,
                                "encoder": False, "r": 8}
    assert parse_recipe("default").overrides == {}
    selftrained = parse_recipe("self:pseudo=100;r=8")  # a key of the benchmark's own, not LoRA's
    assert selftrained.pseudo == 100 and selftrained.lora_overrides == {"r": 8}
    assert parse_recipe("x:r=8").pseudo == 0
    for bad in ("x:device=cpu", "x:lr=1", "x:r=eight", ":r=8", "x:r", "../x:r=8", "x:pseudo=-1", "x:pseudo=a"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_recipe(bad)


def test_self_training_takes_the_surest_transcribed_clips_outside_the_trained_ones(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import loopscribe.bench.recipe as recipe
    from ml_backend.settings import Settings

    transcripts = [(0.9, "a"), (0.2, "b"), (0.95, " "), (0.8, "d"), (0.99, "e"), (0.5, "f")]
    assert recipe.surest(transcripts, {4}, 2) == [0, 3]  # the surest, not trained on already, with words
    assert recipe.surest(transcripts, set(), 0) == []
    assert recipe.recipe_lora(Settings(), recipe.parse_recipe("self:pseudo=5")).r == Settings().lora_r

    calls = []

    class Engine:
        def transcribe(self, audio, options):
            calls.append(audio)
            return [SimpleNamespace(confidence=0.5 + i / 10, text=f"t{i}") for i in range(len(audio))]

    monkeypatch.setattr(recipe, "load", lambda path: path)
    clips = [SimpleNamespace(path="x.wav"), SimpleNamespace(path="y.wav")]
    cache = tmp_path / "pool-0.json"
    first = recipe.transcribed_pool(cache, {"seed": 0}, Engine(), clips, None)
    assert first == [(0.5, "t0"), (0.6, "t1")] and calls == [["x.wav", "y.wav"]]
    assert recipe.transcribed_pool(cache, {"seed": 0}, Engine(), clips, None) == first and len(calls) == 1  # kept
    recipe.transcribed_pool(cache, {"seed": 1}, Engine(), clips, None)
    assert len(calls) == 2  # another seed's pool is transcribed again


def test_recipes_are_compared_with_the_first_per_seed_and_per_utterance(tmp_path, capsys):
    import dataclasses

    from loopscribe.bench.recipe import Recipe, Run, summarize, summarize_runs

    def run(recipe, seed, errors):
        return Run(recipe, seed, sum(errors) / 20, 0.5, (0.07, 0.08), 30, 300.0, 0.4,
                   [(e, 4) for e in errors])

    same, fewer = [2, 1, 3, 0, 2], [1, 0, 2, 0, 1]
    runs = [run("default", 0, same), run("default", 1, same), run("better", 0, fewer), run("better", 1, fewer)]
    summary = summarize(runs, [Recipe("default"), Recipe("better", {"learning_rate": 0.002})], 0.95)
    better = summary["recipes"]["better"]
    assert summary["seeds"] == [0, 1] and better["overrides"] == {"learning_rate": 0.002}
    assert better["vs_reference"][0] == pytest.approx(-0.2)  # 4 fewer errors in 20 words, on both seeds
    assert better["vs_reference_pooled"]["improved"] == 8 and better["vs_reference_pooled"]["worsened"] == 0
    assert better["drops"] == [pytest.approx(0.6)] * 2  # 0.5 → 0.2
    assert summary["recipes"]["default"]["vs_reference"][0] == 0
    printed = capsys.readouterr().out
    assert "better" in printed

    # seeds run apart are summarized together from their runs.json; a recipe missing a seed is left out
    for seed in (0, 1):
        mine = [r for r in runs if r.seed == seed] + ([run("partial", 0, fewer)] if seed == 0 else [])
        (tmp_path / f"{seed}.json").write_text(json.dumps([dataclasses.asdict(r) for r in mine]))
    assert summarize_runs([tmp_path / "0.json", tmp_path / "1.json"], 0.95) == 0
    again = capsys.readouterr().out
    assert "left out, not run on every seed: partial" in again
    assert again.splitlines()[-3] == printed.splitlines()[-3]  # the same row for "better"
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "other.json").write_text('{"recipes": {}}')  # a recipe.json, not a runs.json
    for wrong in ("empty.json", "other.json", "missing.json"):
        assert summarize_runs([tmp_path / wrong], 0.95) == 2


def test_a_recipe_folder_resumes_what_ran_and_refuses_a_name_reused_for_other_settings(tmp_path):
    import dataclasses

    from loopscribe.bench.recipe import (
        Recipe,
        Run,
        already_run,
        as_json,
        base_of_seed,
        read_runs,
        recipe_lora,
        recorded_arguments,
    )

    lr = Recipe("lr", {"learning_rate": 0.002, "target_modules": ("q_proj", "v_proj")})
    runs = [Run("default", 0, 0.3, 0.4, None, 27, 500.0, 0.5, [(1, 4)], {}),
            Run("lr", 0, 0.3, 0.4, None, 27, 500.0, 0.5, [(1, 4)], as_json(lr.overrides)),
            Run("old", 1, 0.3, 0.4, None, 27, 500.0, 0.5, [(1, 4)])]  # from before overrides were stored
    (tmp_path / "runs.json").write_text(json.dumps([dataclasses.asdict(r) for r in runs]))
    again = read_runs(tmp_path / "runs.json")
    assert again == runs  # the overrides read back as they were written (the module tuple as a list)
    assert already_run(again, [Recipe("default"), lr, Recipe("old", {"r": 8}), Recipe("new")]) == {
        ("default", 0), ("lr", 0), ("old", 1)}
    with pytest.raises(ValueError, match="'lr' already ran in this folder"):
        already_run(again, [Recipe("lr", {"learning_rate": 0.003})])
    with pytest.raises(ValueError, match="not a runs.json"):
        read_runs(tmp_path / "missing.json")

    # "default" is what the settings say: a run of it under LORA_R=32 is not the default under LORA_R=8
    settings = dataclasses.replace(Settings.from_env(), lora_r=32, lora_alpha=64)
    rank8 = dataclasses.replace(settings, lora_r=8, lora_alpha=16)
    default = recorded_arguments(recipe_lora(settings, Recipe("default")))
    ran = [dataclasses.replace(runs[0], arguments=default)]
    assert recorded_arguments(recipe_lora(settings, lr))["learning_rate"] == 0.002
    assert already_run(ran, [Recipe("default")], {"default": default}) == {("default", 0)}
    with pytest.raises(ValueError, match=r"'default' already ran in this folder with alpha=64, r=32 "
                                         r"\(now alpha=16, r=8\)"):
        already_run(ran, [Recipe("default")], {"default": recorded_arguments(recipe_lora(rank8, Recipe("default")))})
    # a run recorded before a field was added trained as its default: still the same recipe, unless it now differs
    older = [dataclasses.replace(runs[0], arguments={k: v for k, v in default.items() if k != "speed_perturb"})]
    assert already_run(older, [Recipe("default")], {"default": default}) == {("default", 0)}
    with pytest.raises(ValueError, match=r"with speed_perturb=0.0 \(now speed_perturb=0.1\)"):
        already_run(older, [Recipe("default")], {"default": {**default, "speed_perturb": 0.1}})

    # a seed's ranking is computed once per key (corpus, sizes, base model) and read back after
    calls = []

    def rank() -> dict:
        calls.append(1)
        return {"picked": [3, 1], "error": 0.4}

    cache, key = tmp_path / "base-0.json", {"seed": 0, "pool": 240}
    assert base_of_seed(cache, key, rank)["picked"] == [3, 1]
    assert base_of_seed(cache, key, rank)["error"] == 0.4 and len(calls) == 1
    base_of_seed(cache, {**key, "pool": 200}, rank)  # another pool: ranked again
    assert len(calls) == 2 and json.loads(cache.read_text())["key"]["pool"] == 200
