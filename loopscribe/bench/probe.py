"""``loopscribe bench probe``: how the served backend holds up against slow clients and a burst of /predict.

Needs the running stack (``loopscribe up``), and talks to it on its loopback ``BACKEND_URL`` only,
with a bounded number of connections and requests. It measures what the robustness issue was
about, as ratios and latencies against the idle backend in the same run:

* ``/health`` latency idle, with ``--slow`` connections that never finish their headers held open,
  and while ``--burst`` parallel ``/predict`` requests (distinct audio, so no cache answers) run;
* whether a ``/predict`` still succeeds while the slow connections are held;
* how the burst was answered (200, or 503 with ``Retry-After`` beyond ``MAX_CONCURRENT_PREDICTS``).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np
import requests

from ml_backend.settings import Settings

from ..paths import LABEL_CONFIG


def _health(url: str) -> float:
    start = time.perf_counter()
    requests.get(f"{url}/health", timeout=60).raise_for_status()
    return time.perf_counter() - start


def _slow_connections(url: str, n: int) -> list[socket.socket]:
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"bench probe only targets a loopback backend, not {parts.hostname}")
    socks = []
    for _ in range(n):
        sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=10)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: probe\r\nX-Never-Finished: ")
        socks.append(sock)
    return socks


def bench_probe(args: argparse.Namespace, settings: Settings) -> int:
    from .. import labelstudio, stack
    from ..demo import SENTENCES, load, sentence_clips, with_noise, write_wav

    url = settings.backend_url
    auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None
    ls = labelstudio.client(settings)
    media = stack.StackPaths(settings.home).media
    seed = int(time.time())
    out = media / f"probe-{seed}"
    base = sentence_clips(settings.home / "cache" / "espeak", list(SENTENCES), per_language=2)
    paths = []
    for i in range(args.burst + 1):  # fresh audio per request: the backend's cache must not answer
        path = out / f"probe_{i:03d}.wav"
        write_wav(with_noise(load(base[i % len(base)].path), snr_db=40.0, seed=seed + i), path)
        paths.append(path)
    label_config = LABEL_CONFIG.read_text()
    project = labelstudio.create_project(ls, f"probe {time.strftime('%Y%m%d-%H%M%S')}", label_config)
    rows: list[tuple[str, str]] = []
    try:
        labelstudio.import_audio(ls, settings, project, paths, media_root=media, progress=False)
        tasks = [t.model_dump(mode="json") for t in ls.tasks.list(project=project, fields="all")]

        def predict(task: dict) -> tuple[int, float, bool]:
            start = time.perf_counter()
            r = requests.post(f"{url}/predict", json={"tasks": [task], "label_config": label_config}, auth=auth,
                              timeout=600)
            ok = r.status_code == 200 and bool(r.json()["results"][0]["result"])
            return r.status_code, time.perf_counter() - start, ok or bool(r.headers.get("Retry-After"))

        idle = np.array([_health(url) for _ in range(20)])
        rows.append(("/health, idle (p50 of 20)", f"{np.median(idle) * 1000:.1f} ms"))

        slow = _slow_connections(url, args.slow)
        try:
            held = np.array([_health(url) for _ in range(10)])
            code, seconds, ok = predict(tasks[-1])
            rows.append((f"/health, {args.slow} slow clients held (p50 of 10)", f"{np.median(held) * 1000:.1f} ms"))
            rows.append((f"/predict, {args.slow} slow clients held", f"HTTP {code} in {seconds:.2f} s"
                         f"{'' if ok else ' (no prediction)'}"))
        finally:
            for sock in slow:
                sock.close()

        samples: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(_health(url))
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        with ThreadPoolExecutor(args.burst) as pool:
            started = time.perf_counter()
            futures = [pool.submit(predict, t) for t in tasks[: args.burst]]
            sampler.start()
            results = [f.result() for f in futures]
            burst_wall = time.perf_counter() - started
        stop.set()
        sampler.join()
        codes = [c for c, _, _ in results]
        lat = np.array(samples)
        rows.append((f"/health during {args.burst} parallel /predict (p50 / max of {lat.size})",
                     f"{np.median(lat) * 1000:.1f} ms / {lat.max() * 1000:.1f} ms"))
        rows.append((f"/predict burst answers ({burst_wall:.1f} s)",
                     f"{codes.count(200)} × 200, {codes.count(503)} × 503 + Retry-After, "
                     f"{len(codes) - codes.count(200) - codes.count(503)} other"))
        rows.append(("/health slowest in burst vs idle p50", f"{lat.max() / np.median(idle):.1f}×"))
    finally:
        if not args.keep:
            ls.projects.delete(id=project)
            shutil.rmtree(out, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    print(f"{'probe':{width}s}  result\n{'-' * width}  ------")
    for name, value in rows:
        print(f"{name:{width}s}  {value}")
    return 0
