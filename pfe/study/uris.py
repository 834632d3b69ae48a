"""URIs and paths of tracking stores and storage: masking credentials, local vs shared."""

from __future__ import annotations

import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from pfe.errors import ConfigError, PFEError

_CRED = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*)(?::(?P<pw>[^/@\s]*))?@")
_QUERY_SECRET = re.compile(
    r"(?i)([?&](?:password|passwd|pwd|token|access_token|secret|secret_key|key|api_key|sig|signature)=)[^&\s]*"
)
NETWORK_FS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "lustre",
        "gpfs",
        "beegfs",
        "glusterfs",
        "ceph",
        "fuse.ceph",
        "cephfs",
        "fuse.glusterfs",
        "fuse.sshfs",
        "fuse.gcsfuse",
        "fuse.s3fs",
        "fuse.juicefs",
        "9p",
        "virtiofs",
        "fuse.mountpoint-s3",
        "efs",
        "wekafs",
        "fuse.weka",
    }
)


RUN_ADVICE = (
    "start it, fix `tracking.uri` / MLFLOW_TRACKING_URI, or leave them unset for a local SQLite file. "
    "No trial was started."
)


class TrackingError(PFEError):
    """The tracking store cannot be used (unreachable server, refused on a cluster, ...)."""


def _mask_userinfo(m: re.Match[str]) -> str:
    if m.group("pw") is not None:
        return f"{m.group('scheme')}{m.group('user')}:***@"
    return f"{m.group('scheme')}***@" if m.group("user") else m.group(0)


def mask_uri(uri: str) -> str:
    """Hide credentials: ``https://u:pw@host`` -> ``https://u:***@host``, ``https://tok@host`` ->
    ``https://***@host``, and secret query values (``?token=...``) -> ``***``."""
    return _QUERY_SECRET.sub(r"\1***", _CRED.sub(_mask_userinfo, uri))


def mask_text(text: str, secrets: list[str]) -> str:
    """Mask every URI with credentials in free text (error messages from clients quote URIs)."""
    for secret in secrets:
        if secret and secret != mask_uri(secret):
            text = text.replace(secret, mask_uri(secret))
    return _QUERY_SECRET.sub(r"\1***", _CRED.sub(_mask_userinfo, text))


def absolute_sqlite_uri(uri: str) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////abs/rel.db``; a plain folder path -> absolute; others unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    if "://" not in uri and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri):
        return str(Path(uri).resolve())  # a plain folder path: MLflow's file store
    return uri


def tracking_scheme(uri: str) -> str:
    """``http``, ``https``, ``databricks``, ``sqlite``, ``postgresql``, ``file`` ... (``file`` for a plain path)."""
    scheme = urlsplit(uri).scheme.lower()
    if not scheme or (len(scheme) == 1 and os.name == "nt"):
        return "file"
    return scheme.split("+", 1)[0]


def is_local_tracking(uri: str) -> bool:
    """A store only this machine can write: a SQLite file or a local folder."""
    return tracking_scheme(uri) in ("sqlite", "file")


def sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :].split("?", 1)[0])
    return None


def filesystem_type(path: str | Path) -> str | None:
    """The mount type (``ext4``, ``nfs4`` ...) of the mount holding ``path`` (Linux /proc/mounts)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = Path(path).resolve()
    while not target.exists() and target != target.parent:
        target = target.parent
    best, best_type = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        if (str(target) == mount_point or str(target).startswith(mount_point.rstrip("/") + "/")) and len(
            mount_point
        ) >= len(best):
            best, best_type = mount_point, parts[2]
    return best_type


def is_shared_storage(storage: str) -> bool:
    """A storage path every node of a cluster can reach: a cloud URI, or a network filesystem mount
    (NFS, Lustre, CephFS, ...). ``PFE_STORAGE_SHARED=1`` vouches for a path this check cannot see."""
    scheme = urlsplit(storage).scheme.lower()
    if scheme and scheme != "file" and len(scheme) > 1:
        return True  # s3://, gs://, abfs://, hdfs:// ...
    if os.environ.get("PFE_STORAGE_SHARED") == "1":
        return True
    path = storage[len("file://") :] if storage.startswith("file://") else storage
    fs = filesystem_type(path)
    return fs is not None and (fs in NETWORK_FS or fs.startswith("fuse."))


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``https://u:pw@host/x`` -> (``https://host/x``, u, pw): MLflow then gets the credentials through
    MLFLOW_TRACKING_USERNAME/PASSWORD, so no message or log line can quote them."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=hostport)), unquote(user) or None, unquote(password) or None


def check_reachable(uri: str, timeout: float = 10.0, advice: str = RUN_ADVICE) -> None:
    """An http(s) tracking server must answer before it is used (any HTTP status counts); else a
    :class:`TrackingError` naming the masked URI, the reason and ``advice``."""
    if tracking_scheme(uri) not in ("http", "https"):
        return
    clean, _, _ = split_credentials(uri)
    url = clean.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered (401/403/404 ...): reachable; the client reports auth problems itself
    except (TimeoutError, urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(
            f"tracking server {mask_uri(uri)} is unreachable ({mask_text(str(reason), [uri])}); {advice}"
        ) from None


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else ``sqlite:///<cwd>/mlflow.db`` (absolute): where a study without a
    ``tracking.uri`` records, and where `report` and `ui` look without --tracking-uri."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def check_ray_address(address: str | None, timeout: float = 10.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) Ray address must accept a connection before the study opens
    anything: ray.init retries a dead head's GCS for minutes. ``auto``, ``local`` and none pass (ray.init
    itself says when ``auto`` finds no cluster)."""
    if not address or address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--address {address}: use host:port, ray://host:port, auto or local")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConfigError(
            f"--address {address}: no Ray head answers there ({err.strerror or err}); start the cluster "
            "(cluster/README.md) or check RAY_ADDRESS, or run without --address on this machine"
        ) from None


def check_sqlite_file(uri: str) -> None:
    """A ``sqlite:///`` store that exists must be an SQLite database (MLflow fails on any other file with a
    SQLAlchemy traceback); an absent or empty file is a new store."""
    path = sqlite_path(uri)
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            raise TrackingError(
                f"tracking store {path} is not an SQLite database; point the tracking URI at the study's "
                "mlflow.db (tracking.uri, --tracking-uri or MLFLOW_TRACKING_URI)"
            )


def open_client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri``; credentials in it go to MLflow through MLFLOW_TRACKING_USERNAME /
    PASSWORD (:func:`split_credentials`), never in the URI it quotes."""
    from mlflow import MlflowClient

    check_sqlite_file(uri)

    clean, user, password = split_credentials(uri)
    if user:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user)
    if password:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password)
    return MlflowClient(tracking_uri=clean)
