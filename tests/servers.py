"""Real servers for the ``distributed`` tests: a throwaway PostgreSQL, Redis and S3 on loopback.

The Debian ``postgresql`` and ``redis-server`` packages (installed by ``./scripts/test``) provide
the binaries. PostgreSQL runs as the ``postgres`` user when the tests run as root (``initdb``
refuses root), from a fresh data directory, trusting loopback connections only; Redis keeps
nothing on disk. Each is stopped afterwards.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql; ./scripts/test does it)")
    return Path(found[-1]).parent


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start PostgreSQL on 127.0.0.1 and yield the URL of an empty ``loopscribe`` database."""
    bin_dir, port = postgres_bin(), _free_port()
    root = Path(tempfile.mkdtemp(prefix="loopscribe-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        os.chmod(root, 0o755)
        shutil.chown(root, "postgres", "postgres")
        # runuser lives in /usr/sbin, which a minimal PATH (env -i, cron, CI runners) leaves out
        runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin") or "runuser"
        as_user = [runuser, "-u", "postgres", "--"]
    data, log = root / "data", root / "server.log"

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres", "--no-sync")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200")
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "loopscribe")
        yield f"postgresql://postgres@127.0.0.1:{port}/loopscribe"
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr or exc.stdout}") from exc
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def redis_server() -> Iterator[str]:
    """Start Redis on 127.0.0.1 (no persistence) and yield its URL."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise RuntimeError("Redis is not installed (apt-get install redis-server; ./scripts/test does it)")
    port, root = _free_port(), Path(tempfile.mkdtemp(prefix="loopscribe-redis-"))
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(root), "--protected-mode", "yes"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Redis did not start: {proc.stdout.read() if proc.stdout else ''}")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(server_url: str) -> str:
    """A new, empty database on the server of ``server_url``; its URL."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from ml_backend.database import database_url

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(database_url(server_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as db:
        db.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(database_url(server_url)).set(database=name).render_as_string(hide_password=False)


@contextmanager
def s3_server() -> Iterator[str]:
    """An S3-compatible server (moto's, from the test extras) on 127.0.0.1; yields its endpoint URL."""
    import sys
    import time
    import urllib.request

    port = _free_port()
    binary = Path(sys.executable).with_name("moto_server")
    server = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("the S3 test server did not start")
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses clients; one may still point at an earlier server
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)
