"""Start a lean `mlflow server` subprocess and wait until it answers ``/health``.

Lean = one worker and no job runner (``--workers 1``, ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``):
2 processes and ~0.5 GB instead of 15 processes and ~2.4 GB with MLflow's defaults. Used by
`pfe-study ui` and by the tests that need a real tracking server.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pfe.errors import PFEError

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _url_host(host: str) -> str:
    """The host part of a URL for a bind address (0.0.0.0 -> 127.0.0.1, IPv6 in brackets)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


@dataclass
class MlflowServer:
    """A running `mlflow server` subprocess (its own process group)."""

    proc: subprocess.Popen
    url: str
    log_path: Path | None = None
    started_s: float = 0.0
    _stopped: bool = field(default=False, repr=False)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the server's process group, SIGKILL it after ``timeout`` s; returns the exit code."""
        if self._stopped:
            return self.proc.returncode
        self._stopped = True
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # workers left behind in the group (the group id is the server's pid, which we started)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def __enter__(self) -> MlflowServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def health_ok(url: str, timeout: float = 2.0) -> bool:
    """True when ``<url>/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def server_command(
    backend_store_uri: str,
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int = 1,
    artifacts_destination: str | None = None,
    allowed_hosts: str | None = None,
) -> list[str]:
    """The `mlflow server` command line (run with this interpreter)."""
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    if artifacts_destination:
        cmd += ["--artifacts-destination", artifacts_destination]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


def lean_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a lean server: no job runner."""
    env = dict(os.environ if base is None else base)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def start_mlflow_server(
    backend_store_uri: str,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    workers: int = 1,
    artifacts_destination: str | None = None,
    allowed_hosts: str | None = None,
    log_path: str | Path | None = None,
    timeout: float = 90.0,
) -> MlflowServer:
    """Start `mlflow server` on ``backend_store_uri`` and return once ``/health`` answers.

    ``port=None`` picks a free port. The server's output goes to ``log_path`` (else is discarded);
    on failure the last lines of that log are in the error. Raises PFEError if it does not come up
    within ``timeout`` seconds.
    """
    port = free_port(host if host not in ("0.0.0.0", "::") else "127.0.0.1") if port is None else port
    url = f"http://{_url_host(host)}:{port}"
    if health_ok(url, timeout=1.0):
        raise PFEError(f"port {port} on {host} already has a server answering /health; pick another --port")
    log_file = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - kept open for the child
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            server_command(
                backend_store_uri,
                host=host,
                port=port,
                workers=workers,
                artifacts_destination=artifacts_destination,
                allowed_hosts=allowed_hosts,
            ),
            env=lean_env(),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() ends the workers too
        )
    finally:
        if log_path:
            log_file.close()
    server = MlflowServer(proc=proc, url=url, log_path=Path(log_path) if log_path else None)
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if health_ok(url, timeout=1.0):
            server.started_s = time.monotonic() - t0
            return server
        time.sleep(0.25)
    code = proc.poll()
    server.stop()
    tail = ""
    if log_path and Path(log_path).exists():
        tail = "\n" + "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-15:])
    what = f"exited with code {code}" if code is not None else f"did not answer /health within {timeout:.0f} s"
    raise PFEError(f"mlflow server on {backend_store_uri} ({url}) {what}{tail}")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc), for counting a server's processes."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out
