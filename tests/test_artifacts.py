"""Adapters on shared storage (``ARTIFACTS_URL``): a worker stores, a replica elsewhere loads.

The S3 test runs against an S3-compatible server started on loopback (moto) with the
registry's metadata in a real PostgreSQL, two homes standing in for two machines.
"""

from __future__ import annotations

import pytest

from ml_backend.errors import ConfigurationError
from ml_backend.registry import ModelVersion, Registry

BASE = "whisper-base-abc"


def adapter_files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_unusable_artifacts_url_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigurationError, match="ARTIFACTS_URL"):
        Registry(tmp_path, artifacts="nosuchprotocol://bucket/x")


@pytest.fixture
def s3_bucket(monkeypatch):
    """An S3-compatible server (moto) on loopback with an empty bucket ``loopscribe``; yields its filesystem."""
    import fsspec
    from servers import s3_server

    with s3_server() as endpoint:
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
                            "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        fs = fsspec.filesystem("s3")
        fs.mkdir("loopscribe")
        yield fs


@pytest.mark.distributed
def test_an_adapter_stored_on_s3_by_one_machine_serves_on_another(tmp_path, s3_bucket, postgres_url):
    from servers import fresh_database

    fs = s3_bucket
    database, artifacts = fresh_database(postgres_url), "s3://loopscribe/artifacts"
    adapter = tmp_path / "trained"
    (adapter / "nested").mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 32}')
    (adapter / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 100)
    (adapter / "nested" / "note.txt").write_text("kept")

    worker = Registry(tmp_path / "worker-home", database, artifacts)
    worker.add(ModelVersion(version="v1", base_version=BASE, base_model="/m", parent=BASE, project=4,
                            created_at="2026-11-26T00:00:00Z"), adapter)
    worker.promote("v1", BASE)
    assert sorted(fs.find("loopscribe/artifacts")) == [
        f"loopscribe/artifacts/versions/v1/adapter/{n}"
        for n in ("adapter_config.json", "adapter_model.safetensors", "nested/note.txt")]
    assert not (tmp_path / "worker-home" / "registry" / "versions").exists()  # nothing kept beside S3

    replica = Registry(tmp_path / "replica-home", database, artifacts)
    assert replica.live(BASE, 4).version == "v1"  # the pointer, from the shared database
    local = replica.adapter_path("v1")
    assert local.is_relative_to(tmp_path / "replica-home") and adapter_files(local) == adapter_files(adapter)
    fs.rm("loopscribe/artifacts", recursive=True)
    assert adapter_files(replica.adapter_path("v1")) == adapter_files(adapter)  # cached: downloaded once


@pytest.mark.distributed
def test_training_audio_decoded_on_one_machine_is_not_fetched_again_on_another(settings, tmp_path, monkeypatch,
                                                                             s3_bucket):
    """ARTIFACTS_URL also carries the decoded-audio cache: the second machine reads the clip from S3."""
    from dataclasses import replace

    import numpy as np

    from training import dataset

    clip, fetched = np.linspace(-1, 1, 16_000, dtype=np.float32), []
    monkeypatch.setattr(dataset, "load_task_audio", lambda fetcher, task, data, key: fetched.append(task) or clip)
    data = {"audio": "/data/upload/3/clip.wav"}
    first, second = (dataset.AudioCache(replace(settings, home=tmp_path / name,
                                                artifacts_url="s3://loopscribe/artifacts"))
                     for name in ("worker-a", "worker-b"))
    assert np.array_equal(first.load(3, data, "audio"), clip) and fetched == [3]
    assert np.array_equal(second.load(3, data, "audio"), clip) and fetched == [3]  # from S3, not fetched
    assert np.array_equal(second.load(3, data, "audio"), clip) and fetched == [3]  # then from its own disk
    assert len(s3_bucket.find("loopscribe/artifacts/cache/audio")) == 1
    unshared = dataset.AudioCache(replace(settings, home=tmp_path / "alone", artifacts_url=""))
    assert unshared.shared is None and np.array_equal(unshared.load(3, data, "audio"), clip) and fetched == [3, 3]
