"""Integration: a real Label Studio 1.23.2 (own venv, SQLite, loopback) and the real backend under gunicorn.

Nothing is mocked: audio is imported through the CLI code path, predictions come from
the bundled Whisper base, Label Studio calls the backend for "Retrieve predictions" and
sends its webhooks to it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import requests

from loopscribe import labelstudio, stack
from loopscribe.demo import SENTENCES, demo_clips, speak
from ml_backend.fetch import LabelStudioAuth
from ml_backend.ledger import Ledger
from ml_backend.projects import ProjectDirectory
from ml_backend.splits import LATER_BAND, POOL_BAND, ahead_cutoff, confidence_of, split_position

pytestmark = pytest.mark.slow
CONFIG = (Path(__file__).resolve().parents[1] / "label_config.xml").read_text()


@pytest.fixture(scope="module")
def live(settings, engine, tmp_path_factory, launch_stack):
    with launch_stack(settings, tmp_path_factory) as stack_:
        yield stack_


@pytest.fixture(scope="module")
def ls(live):
    return labelstudio.client(live[0])


def api(live, path: str, **kwargs) -> requests.Response:
    s = live[0]
    return requests.get(f"{s.label_studio_url}{path}", headers={"Authorization": f"Token {s.label_studio_api_key}"},
                        timeout=30, **kwargs)


@pytest.fixture(scope="module")
def ranked_project(live, ls, engine, shared_audio):
    """≥6 clips of varying difficulty, imported and pre-annotated in bulk."""
    s, paths, _ = live
    project = labelstudio.find_or_create_project(ls, "ranking", CONFIG)
    clips = [c.path for c in demo_clips(s.home / "demo")][:8]
    clips += [shared_audio / n for n in ("jfk_en.flac", "comfyui_en.mp3", "dictee_fr.aiff")]
    report = labelstudio.import_audio(ls, s, project, clips, media_root=paths.media, progress=False)
    assert report.tasks_created == len(clips) and not report.failed
    predicted = labelstudio.predict_project(ls, s, project, engine, progress=False)
    assert predicted.predicted == len(clips) and not predicted.failed
    labelstudio.connect_backend(ls, project, s)
    return project


def test_predictions_mark_where_the_model_is_unsure(live, ls, ranked_project, shared_audio, engine):
    """The default config's "unsure" Labels: a region on each stretch of improbable words, which Label Studio
    accepts in a prediction and keeps in an annotation started from it."""
    s, paths, _ = live
    tasks = {Path(t.data["source_file"]).name: t for t in ls.tasks.list(project=ranked_project, fields="all")}
    regions = {name: [r for r in t.predictions[0].result if r["type"] == "labels" and r["from_name"] == "unsure"]
               for name, t in tasks.items()}
    comfy = regions["comfyui_en.mp3"]  # base Whisper mishears "ComfyUI": that is where to listen
    assert comfy and all(r["value"]["labels"] == ["unsure"] for r in comfy), tasks["comfyui_en.mp3"]
    assert any(r["value"]["start"] < 2.0 < r["value"]["end"] + 0.5 for r in comfy), comfy
    assert sum(map(len, regions.values())) < 4 * len(regions)  # guidance, not every word
    project = labelstudio.create_project(ls, "unsure regions", CONFIG)
    labelstudio.import_audio(ls, s, project, [shared_audio / "comfyui_en.mp3"], media_root=paths.media,
                             progress=False)
    labelstudio.predict_project(ls, s, project, engine, progress=False)
    (task,) = ls.tasks.list(project=project, fields="all")
    annotation = labelstudio.submit_transcript(ls, task, "Then you go into your ComfyUI folder again", "en")
    kept = [r for r in ls.annotations.get(id=annotation).result if r["type"] == "labels"]
    assert kept and kept[0]["value"]["labels"] == ["unsure"]


def test_labeling_page_shows_the_prediction_in_a_real_browser(live, ls, ranked_project, tmp_path):
    """Headless Chromium logs in to Label Studio and opens a task: the transcript, the language and the
    "Model unsure" region the backend predicted are what the annotator sees (read from the rendered page,
    not compared pixel by pixel)."""
    from browser import Browser
    from dotenv import dotenv_values

    from ml_backend.annotations import extract

    s, _, env_file = live
    login = dotenv_values(env_file)
    task = next(t for t in ls.tasks.list(project=ranked_project, fields="all")
                if Path(t.data["source_file"]).name == "comfyui_en.mp3")
    predicted = extract(task.predictions[0].result)
    browser = Browser()
    try:
        browser.goto(f"{s.label_studio_url}/user/login/")
        browser.evaluate(f"""(() => {{
            document.querySelector('input[name=email]').value = {json.dumps(login["LABEL_STUDIO_USERNAME"])};
            document.querySelector('input[name=password]').value = {json.dumps(login["LABEL_STUDIO_PASSWORD"])};
            document.querySelector('form').submit(); }})()""")
        browser.wait_for("!location.pathname.startsWith('/user/login')")
        browser.goto(f"{s.label_studio_url}/projects/{ranked_project}/data?task={task.id}")
        shown = browser.wait_for(f"document.body.innerText.includes({json.dumps(predicted.text)}) "
                                 "&& document.body.innerText", timeout=120)
        # the Choices render a moment after the text on a loaded machine: wait for them too
        selected = browser.wait_for("[...document.querySelectorAll('.lsf-choices [data-value]')]"
                                    ".map(e => e.dataset.value).join('|')", timeout=60)
        shot = browser.screenshot(tmp_path / "labeling.png")
    finally:
        browser.close()
    assert predicted.text in shown and predicted.language == "en"
    assert selected == "English (en)", selected  # the language Choices shows the predicted language
    assert shown.count("Model unsure") >= 2, shown  # the label, and the predicted region in the regions list
    import matplotlib.image

    assert matplotlib.image.imread(shot).shape[:2] == (900, 1366)


def test_next_serves_least_confident_first(live, ls, ranked_project, engine):
    project = ls.projects.get(id=ranked_project)
    assert project.model_version == engine.model_version and project.sampling == labelstudio.UNCERTAINTY_SAMPLING
    tasks = list(ls.tasks.list(project=ranked_project, fields="all"))
    assert len(tasks) >= 6
    assert all(p.model_version == project.model_version for t in tasks for p in t.predictions)
    served = []
    for _ in range(len(tasks)):
        task = api(live, f"/api/projects/{ranked_project}/next").json()
        assert task["predictions"], task
        served.append(task["predictions"][0]["score"])
        # the annotator accepts the prediction: the next /next moves on
        ls.annotations.create(id=task["id"], result=task["predictions"][0]["result"], was_cancelled=False)
    assert served == sorted(served), served
    assert len(set(served)) > 3  # the clips really differ in confidence


def test_next_serves_a_random_heldout_sample_first_and_the_rest_after_the_pool(live, ls, engine, monkeypatch):
    """The held-out split's serving bands: its "ahead" tasks come first whatever their confidence, then the pool
    least confident first, then the rest of the held-out split."""
    s, paths, _ = live
    project = labelstudio.create_project(ls, "held-out ahead", CONFIG)
    clips = [c.path for c in demo_clips(s.home / "demo")][:6]
    labelstudio.import_audio(ls, s, project, clips, media_root=paths.media, progress=False)
    ids = sorted(t.id for t in ls.tasks.list(project=project, fields="task_only"))
    by_position = sorted(ids, key=lambda t: split_position(project, t))
    edge = [split_position(project, t) for t in by_position]
    # a fraction between this project's hash positions: 4 tasks held out, 2 in the pool; of the held-out
    # tasks, the count (no share) puts the 2 of lowest hash ahead, found from the project's task list
    heldout = (edge[3] + edge[4]) / 2
    s_ = replace(s, heldout_ahead=0.0, heldout_fraction=heldout, heldout_ahead_tasks=2)
    labelstudio.predict_project(ls, s_, project, engine, progress=False)
    served, scores = [], []
    for _ in ids:
        task = api(live, f"/api/projects/{project}/next").json()
        served.append(task["id"])
        scores.append(task["predictions"][0]["score"])
        ls.annotations.create(id=task["id"], result=task["predictions"][0]["result"], was_cancelled=False)
    assert set(served[:2]) == set(by_position[:2]), (served, by_position)  # ahead: by hash, not difficulty
    assert set(served[2:4]) == set(by_position[4:]), (served, by_position)  # the pool, then …
    assert set(served[4:]) == set(by_position[2:4])  # … the rest of the held-out split
    assert scores[2] <= scores[3] and all(0 <= confidence_of(x) <= 1 for x in scores)
    assert all(t.predictions for t in ls.tasks.list(project=project, fields="all"))  # Label Studio took every one
    # the backend lists the same task ids from Label Studio's API, so its own predictions use the same cutoff
    directory = ProjectDirectory(LabelStudioAuth(s.label_studio_url, s.label_studio_api_key))
    assert sorted(directory.task_ids(project) or []) == ids == sorted(labelstudio.project_task_ids(ls, project))
    # a shard of a queued run scores with the cutoff its run kept: the same bands, the project not listed again
    listings: list[int] = []
    real_listing = labelstudio.project_task_ids
    monkeypatch.setattr(labelstudio, "project_task_ids", lambda ls_, p: listings.append(p) or real_listing(ls_, p))
    cutoff = ahead_cutoff(project, len(ids), lambda: ids, heldout, 0.0, 2)
    first = {t.id: t.predictions[0].score for t in ls.tasks.list(project=project, fields="all")}
    labelstudio.predict_project(ls, s_, project, engine, only_missing=False, task_ids=ids[:4], ahead=cutoff,
                                progress=False)
    tasks = {t.id: t.predictions for t in ls.tasks.list(project=project, fields="all")}
    assert [len(tasks[t]) for t in ids] == [2, 2, 2, 2, 1, 1]  # the shard's tasks got a second prediction
    again = {t: max(tasks[t], key=lambda p: p.id).score for t in ids[:4]}

    def band(score: float) -> str:  # the serving band a score lies in (confidences may differ by the batch's padding)
        return "ahead" if score < POOL_BAND[0] else "later" if score >= LATER_BAND[0] else "pool"

    assert listings == [] and {t: band(x) for t, x in again.items()} == {t: band(first[t]) for t in ids[:4]}
    assert [band(first[t]) for t in by_position] == ["ahead"] * 2 + ["later"] * 2 + ["pool"] * 2


def test_webhooks_from_label_studio_reach_the_backend_with_the_secret(live):
    """Runs after the ranking test, whose annotations fire ANNOTATION_CREATED."""
    events_file = live[0].home / "webhooks" / "events.jsonl"
    assert events_file.exists(), "Label Studio's ANNOTATION_CREATED webhooks were refused or never sent"
    actions = [json.loads(line)["event"]["action"] for line in events_file.read_text().splitlines()]
    assert "ANNOTATION_CREATED" in actions


def test_webhook_for_a_project_label_studio_lacks_is_ignored(live, ranked_project):
    """The backend asks the real Label Studio whether a webhook's project exists; only real ones are recorded."""
    from ml_backend.app import WEBHOOK_SECRET_HEADER
    from ml_backend.ledger import Ledger

    s = live[0]
    headers = {WEBHOOK_SECRET_HEADER: s.webhook_secret}
    event = {"action": "ANNOTATION_CREATED", "annotation": {"id": 990001, "task": 1, "result": [
        {"type": "textarea", "from_name": "transcription", "to_name": "audio", "value": {"text": ["made up"]}}]}}
    missing = requests.post(f"{s.backend_url}/webhook", json=event | {"project": {"id": 424242}}, headers=headers,
                            timeout=10)
    assert missing.status_code == 200 and missing.json()["status"] == "ignored"
    assert 424242 not in Ledger(s.ledger_url).projects()
    real = requests.post(f"{s.backend_url}/webhook", json=event | {"project": {"id": ranked_project}},
                         headers=headers, timeout=10)
    assert real.status_code == 201 and real.json()["changed"] == 1


def test_concurrent_uploads_attach_metadata_to_their_own_task(live, ls, espeak_dir):
    """Defect: the upload path gave its metadata to "the project's newest task", which races with other imports."""
    from concurrent.futures import ThreadPoolExecutor

    s, paths, _ = live
    project = labelstudio.find_or_create_project(ls, "uploads", CONFIG)
    clips = [speak(sentence, lang, espeak_dir / f"upload_{lang}_{i}.wav")
             for lang in ("en", "de") for i, sentence in enumerate(SENTENCES[lang][:2])]
    with ThreadPoolExecutor(4) as pool:
        reports = list(pool.map(lambda c: labelstudio.import_audio(ls, s, project, [c], media_root=paths.media,
                                                                   storage="upload", progress=False), clips))
    for clip, report in zip(clips, reports):
        assert len(report.task_ids) == 1
        data = ls.tasks.get(id=report.task_ids[0]).data
        assert data["source_file"] == str(clip) and data["sha256"][:16] in data["audio"], data


def test_project_languages_restrict_predictions(live, ls, engine, shared_audio):
    """`project create --languages en`: the config offers English only, and French audio is predicted as English."""
    from ml_backend.label_config import parse_label_config

    s, paths, env_file = live
    env = {"LOOPSCRIBE_ENV_FILE": str(env_file), "LOOPSCRIBE_HOME": str(s.home), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "loopscribe.cli", "project", "create", "--title", "english only",
                           "--languages", "en"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    project = labelstudio.find_or_create_project(ls, "english only", CONFIG)
    assert parse_label_config(ls.projects.get(id=project).label_config).language_values == {"en": "en"}
    clips = [shared_audio / "dictee_fr.aiff", shared_audio / "jfk_en.flac"]
    labelstudio.import_audio(ls, s, project, clips, media_root=paths.media, progress=False)
    ls.actions.create(id="retrieve_tasks_predictions", project=project, selected_items={"all": True, "excluded": []})
    choices = [r["value"]["choices"] for t in ls.tasks.list(project=project, fields="all") for p in t.predictions
               for r in p.result if r["type"] == "choices"]
    assert choices == [["en"], ["en"]], choices


def test_retrieve_predictions_action_fetches_upload_and_local_files(live, ls, engine, shared_audio, espeak_dir):
    s, paths, _ = live
    project = labelstudio.find_or_create_project(ls, "retrieve", CONFIG)
    local = labelstudio.import_audio(ls, s, project, [shared_audio / "dictee_fr.aiff"], media_root=paths.media,
                                     progress=False)
    espeak = speak(SENTENCES["de"][0], "de", espeak_dir / "retrieve_de.wav")
    upload = labelstudio.import_audio(ls, s, project, [espeak], media_root=paths.media, storage="upload",
                                      progress=False)
    # two bad tasks: a corrupt file Label Studio serves, and an upload path that 404s
    corrupt = paths.media / f"project-{project}" / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage" * 20)
    bad = ls.projects.import_tasks(id=project, return_task_ids=True, request=[
        {"data": {"audio": f"/data/local-files/?d={corrupt.relative_to(paths.media)}"}},
        {"data": {"audio": f"/data/upload/{project}/no-such-file.wav"}},
    ]).task_ids
    labelstudio.connect_backend(ls, project, s)
    ls.actions.create(id="retrieve_tasks_predictions", project=project, selected_items={"all": True, "excluded": []})
    tasks = {t.id: t for t in ls.tasks.list(project=project, fields="all")}
    good = local.task_ids + upload.task_ids
    assert tasks[upload.task_ids[0]].data["audio"].startswith("/data/upload/")
    assert tasks[local.task_ids[0]].data["audio"].startswith("/data/local-files/")
    for task_id in good:
        predictions = tasks[task_id].predictions
        assert predictions and predictions[0].model_version == engine.model_version, task_id
        texts = [r for r in predictions[0].result if r["type"] == "textarea"]
        assert texts and texts[0]["value"]["text"][0]
    assert {r["value"]["choices"][0] for t in good for r in tasks[t].predictions[0].result if r["type"] == "choices"} \
        == {"fr", "de"}
    for task_id in bad:
        assert all(not p.result for p in tasks[task_id].predictions), task_id


def test_reimport_is_resumable_and_skips_duplicates(live, ls, ranked_project, shared_audio):
    s, paths, _ = live
    again = labelstudio.import_audio(ls, s, ranked_project, [shared_audio / "jfk_en.flac"], media_root=paths.media,
                                     progress=False)
    assert again.tasks_created == 0 and again.duplicates == 1


def test_long_recording_is_split_with_source_offsets(live, ls, shared_audio):
    s, paths, _ = live
    project = labelstudio.find_or_create_project(ls, "split", CONFIG)
    report = labelstudio.import_audio(ls, s, project, [shared_audio / "mit_license_en_de.mp3"], media_root=paths.media,
                                      progress=False)
    tasks = sorted(ls.tasks.list(project=project, fields="all"), key=lambda t: t.data["source_offset"])
    assert report.tasks_created == len(tasks) >= 2
    assert tasks[0].data["source_offset"] == 0 and all(t.data["duration"] <= 30 for t in tasks)
    for a, b in zip(tasks, tasks[1:]):
        assert abs(a.data["source_offset"] + a.data["duration"] - b.data["source_offset"]) < 0.01


def test_a_key_label_studio_refuses_says_what_to_do(live, ls):
    """A second checkout under the same LOOPSCRIBE_HOME brings its own .env: `up` names the cause, not a bare 401."""
    from ml_backend.errors import EnvironmentProblem

    s, paths, env_file = live
    labelstudio.check_token(ls, paths.label_studio_data, env_file)  # the stack's own key passes
    other = labelstudio.client(replace(s, label_studio_api_key="0" * 40))
    with pytest.raises(EnvironmentProblem, match="another key") as refused:
        labelstudio.check_token(other, paths.label_studio_data, env_file)
    assert "0" * 40 not in str(refused.value) and str(paths.label_studio_data) in str(refused.value)


def test_status_json(live, ranked_project):
    s, _, env_file = live
    env = {"LOOPSCRIBE_ENV_FILE": str(env_file), "LOOPSCRIBE_HOME": str(s.home), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "loopscribe.cli", "status", "--json"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert {"label_studio_url", "backend_url", "live_model_version", "queue", "projects"} <= set(status)
    ranking = next(p for p in status["projects"] if p["id"] == ranked_project)
    assert ranking["tasks"] >= 6 and ranking["model_version"] == status["live_model_version"]
    assert s.label_studio_api_key not in proc.stdout + proc.stderr


def test_worker_runs_queued_pre_annotation(live, ls, engine, shared_audio):
    from loopscribe import jobs

    s, paths, _ = live
    assert stack.running_pid(paths, "worker")
    project = labelstudio.find_or_create_project(ls, "queued", CONFIG)
    report = labelstudio.import_audio(ls, s, project, [shared_audio / "one_two_three_en.wav"], media_root=paths.media,
                                      progress=False)
    run, created, sent = jobs.queue_prediction_run(s, project)  # the embedded queue: SQLite, one worker
    assert created and sent == 1
    store = Ledger(s.ledger_url).prediction_runs
    deadline = time.monotonic() + 300
    while store.progress(run).finished_at is None and time.monotonic() < deadline:
        time.sleep(0.5)
    progress = store.progress(run)
    assert progress.states == {"done": 1} and (progress.predicted, progress.failed) == (1, 0)
    # the run kept the cutoff it decided when planned (one task: all of a held-out split under the count)
    assert store.get(run, 0).ahead == ahead_cutoff(project, 1, lambda: report.task_ids, s.heldout_fraction,
                                                   s.heldout_ahead, s.heldout_ahead_tasks)
    task = ls.tasks.get(id=report.task_ids[0])
    assert task.predictions and task.predictions[0].model_version == engine.model_version
    assert ls.projects.get(id=project).model_version == engine.model_version
    assert jobs.queue_status(s)["pending"] == 0
