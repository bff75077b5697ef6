"""Starting and stopping the single-machine stack: what a failed `up` leaves behind (unit tests, no services)."""

from __future__ import annotations

import socket
import sys

import pytest

from loopscribe import stack
from ml_backend.errors import EnvironmentProblem


def test_a_taken_port_is_refused_before_anything_is_started(tmp_path):
    paths = stack.StackPaths(tmp_path / "home")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EnvironmentProblem, match=f"port {port} .*LABEL_STUDIO_URL.*loopscribe down"):
            stack.start_label_studio({"LABEL_STUDIO_URL": f"http://localhost:{port}"}, paths)
    assert not paths.pid_file("label-studio").exists()
    stack.refuse_taken_port(f"http://localhost:{port}", "LABEL_STUDIO_URL")  # free again: no error


def test_a_failed_start_stops_what_it_started_and_nothing_else(tmp_path):
    paths = stack.StackPaths(tmp_path / "home")
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    earlier = stack._spawn(paths, "label-studio", sleeper, {})  # running before: not this start's to stop
    with pytest.raises(EnvironmentProblem, match="refuses the key"):
        with stack.stop_on_failure(paths):
            started = stack._spawn(paths, "ml-backend", sleeper, {})
            raise EnvironmentProblem("Label Studio refuses the key")
    assert not stack.process_alive(started) and stack.running_pid(paths, "ml-backend") is None
    assert stack.running_pid(paths, "label-studio") == earlier
    assert stack.stop(paths) == ["label-studio"]
