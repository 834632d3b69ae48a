"""`pfe-study ui [STUDY | --tracking-uri URI] [--host H] [--port P]`: the MLflow UI on a study's store.

Runs a lean `mlflow server` (one worker, no job runner: 2 processes, ~0.5 GB) bound to 127.0.0.1
unless told otherwise, prints its URL and serves until interrupted (Ctrl-C or SIGTERM), then stops
the server's whole process group. A store that already is a server (http/https URI) is just printed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from pfe.errors import PFEError
from pfe.study.mlflow_server import is_loopback, start_mlflow_server
from pfe.study.report.records import check_store
from pfe.study.uris import default_tracking_uri, mask_uri, sqlite_path

NO_AUTH_WARNING = (
    "warning: binding the MLflow UI to {host}: MLflow has no authentication by default, so anyone who can "
    "reach {host}:{port} can read, change and delete every run in this store. Prefer the default 127.0.0.1 "
    "with an SSH tunnel (ssh -L {port}:127.0.0.1:{port} this-host), or put it behind an authenticating proxy. "
    "MLflow answers only Host headers of localhost and private IPs unless MLFLOW_SERVER_ALLOWED_HOSTS names others."
)


def _resolve(args: argparse.Namespace) -> tuple[str, str | None]:
    """(tracking URI, experiment name or None) from --tracking-uri, the study file, or the defaults."""
    experiment = None
    uri = getattr(args, "tracking_uri", None)
    if getattr(args, "study", None):
        from pfe.study.spec import load_study

        spec = load_study(args.study)
        experiment = spec.experiment
        uri = uri or spec.tracking_uri
    return uri or default_tracking_uri(), experiment


def _sqlite_dir(uri: str) -> Path | None:
    path = sqlite_path(uri)
    return path.parent if path is not None else None


def _experiment_url(uri: str, url: str, experiment: str | None) -> str:
    if not experiment:
        return url
    try:
        from mlflow.tracking import MlflowClient

        found = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    except Exception:  # noqa: BLE001 - the plain URL is still useful
        return url
    return f"{url}/#/experiments/{found.experiment_id}" if found else url


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def cli_ui(args: argparse.Namespace) -> int:
    """Start the lean MLflow UI and serve until interrupted."""
    uri, experiment = _resolve(args)
    host = getattr(args, "host", None) or "127.0.0.1"
    port = int(getattr(args, "port", None) or 5000)
    if uri.startswith(("http://", "https://")):
        print(f"the tracking store is already a server: open {mask_uri(uri)}")
        return 0
    if not is_loopback(host):
        print(NO_AUTH_WARNING.format(host=host, port=port), file=sys.stderr)
    check_store(uri)
    db_dir = _sqlite_dir(uri)
    fd, log_name = tempfile.mkstemp(prefix="pfe-mlflow-ui-", suffix=".log")
    os.close(fd)
    log = Path(log_name)
    t0 = time.monotonic()
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    server = None
    clean = False
    try:
        server = start_mlflow_server(
            uri,
            host=host,
            port=port,
            # new experiments created through this UI keep their artifacts beside the store, not in the cwd
            artifacts_destination=str(db_dir / "mlartifacts") if db_dir else None,
            log_path=log,
        )
        url = server.url
        print(f"MLflow UI for {uri}: {_experiment_url(uri, url, experiment)}")
        print(f"(started in {time.monotonic() - t0:.1f} s, server log {log}; Ctrl-C to stop)", flush=True)
        while server.alive():
            time.sleep(0.5)
        raise PFEError(f"the mlflow server stopped by itself (exit code {server.proc.returncode}); see {log}")
    except (KeyboardInterrupt, _Stop):
        print("stopping the MLflow UI", flush=True)
        clean = True
        return 0
    finally:
        if server is not None:
            server.stop()
        if clean:
            log.unlink(missing_ok=True)  # interrupted as asked: the log holds nothing worth keeping
        for sig, handler in previous.items():
            signal.signal(sig, handler)
