"""A private PostgreSQL cluster and a loopback `mlflow server` (mlruns_config/start_server.sh) for the
tests that need a real tracking server: ``postgres_cluster()``, ``mlflow_server(store_uri, workdir)``.

The PostgreSQL cluster lives in a temporary folder (initdb + pg_ctl, as the ``postgres`` user when
running as root): no system service is needed. It skips when PostgreSQL's server binaries or
psycopg2 are missing."""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START_SERVER = REPO / "mlruns_config" / "start_server.sh"
SERVER_START_TIMEOUT = 180  # seconds; a loaded 2-core machine needs ~20


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def clean_env() -> dict:
    """This environment without MLflow's run/experiment/store variables (a surrounding run must not leak)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"MLFLOW_DISABLE_TELEMETRY": "true"}


# ---- a private PostgreSQL cluster ------------------------------------------------------------------
def _postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/*/bin (Debian)."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).resolve().parent == Path(pg_ctl).resolve().parent:
        return Path(initdb).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found and (Path(found[-1]).parent / "initdb").exists() else None


def _as_cluster_owner():
    """A function turning a command into one run by the cluster's owner: this user, or ``postgres``
    when running as root (initdb and postgres refuse root). None when there is no way to switch."""
    if os.geteuid() != 0:
        return lambda cmd: cmd
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    if shutil.which("runuser"):
        return lambda cmd: ["runuser", "-u", "postgres", "--", *cmd]
    if shutil.which("su"):
        return lambda cmd: ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd)]
    return None


@contextmanager
def postgres_cluster():
    """Yield ``(store_uri, password)`` of a fresh database on a private cluster listening on
    127.0.0.1:<free port> (password authentication over TCP, its unix socket in the cluster's folder);
    the cluster is stopped and removed afterwards."""
    import importlib.util

    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin); "
                    "apt-get install postgresql")
    if importlib.util.find_spec("psycopg2") is None:
        pytest.skip("psycopg2 is not installed: pip install -e '.[postgres]'")
    as_owner = _as_cluster_owner()
    if as_owner is None:
        pytest.skip("running as root without a 'postgres' user or runuser/su to run initdb as")
    import psycopg2

    # Short path under /tmp (unix socket paths are limited to ~100 bytes; pytest's tmp_path is private to root)
    root = Path(tempfile.mkdtemp(prefix="psydef-pg-"))
    data, log, pwfile = root / "data", root / "postgres.log", root / "pwfile"
    password, port = secrets.token_hex(12), free_port()
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        for path in (root, pwfile):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    env = {**clean_env(), "LC_ALL": "C", "LANG": "C"}
    started = False
    try:
        subprocess.run(as_owner([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}",
                                 "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8",
                                 "--locale=C", "--no-sync"]),
                       check=True, capture_output=True, text=True, env=env, cwd=root, timeout=120)
        pwfile.unlink()
        started = True  # pg_ctl stop is harmless when start failed half-way
        proc = subprocess.run(as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                                        "-o", f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off", "start"]),
                              capture_output=True, text=True, env=env, cwd=root, timeout=120)
        assert proc.returncode == 0, f"pg_ctl start failed: {proc.stdout}{proc.stderr}\n{tail(log)}"
        admin = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password=password, dbname="postgres")
        try:
            admin.autocommit = True
            admin.cursor().execute("CREATE DATABASE mlflow")
        finally:
            admin.close()
        # The driver named: SQLAlchemy >= 2.1 maps a bare postgresql:// to psycopg 3, the extra installs psycopg2
        yield f"postgresql+psycopg2://postgres:{password}@127.0.0.1:{port}/mlflow", password
    finally:
        if started:
            subprocess.run(as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                           capture_output=True, env=env, cwd="/", timeout=60)
        shutil.rmtree(root, ignore_errors=True)


# ---- the tracking server ----------------------------------------------------------------------------
def group_cmdlines(pgid: int) -> list[str]:
    """The command lines of the processes in process group ``pgid`` (Linux /proc; [] elsewhere)."""
    lines = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                lines.append(Path(stat).with_name("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError, ValueError):
            continue
    return lines


@contextmanager
def mlflow_server(store_uri: str, workdir: Path):
    """Start mlruns_config/start_server.sh in the foreground in its own process group; yield
    ``(tracking_uri, process, log_path)`` once /health answers; stop the whole group afterwards."""
    port = free_port()
    log = workdir / "server.log"
    env = clean_env() | {"FOREGROUND": "1", "HOST": "127.0.0.1", "PORT": str(port), "BACKEND_STORE_URI": store_uri,
                          "ARTIFACTS_DESTINATION": str(workdir / "artifacts"),
                          "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    uri = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(START_SERVER)], cwd=workdir, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode} before answering:\n{tail(log)}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer {uri}/health within {SERVER_START_TIMEOUT}s:\n{tail(log)}")
            time.sleep(0.5)
        yield uri, proc, log
    finally:
        # The script exec'd mlflow, the leader of a new session: its pid is the group of it and its workers.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in the group (a stuck worker)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
