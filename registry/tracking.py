"""Where the registry's MLflow store is, and the checks that make a wrong one fail early."""

from __future__ import annotations

import importlib.util
import os
import re
import urllib.parse
from pathlib import Path

from registry.errors import UsageError
from registry.home import Home

TRACKING_URI_ENV = "LORAPLEX_TRACKING_URI"
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores
DRIVER_PACKAGES = {  # SQLAlchemy's driver module -> what pip installs it as
    "psycopg": "psycopg[binary]",
    "psycopg2": "psycopg2-binary",
    "MySQLdb": "mysqlclient",
    "pymysql": "PyMySQL",
}
PROBE_TIMEOUT_S = 10  # a tracking server's /health answers in milliseconds when it is up


def resolve_tracking_uri(explicit: str | None = None, home: Home | None = None) -> str:
    """`--tracking-uri`, else `$LORAPLEX_TRACKING_URI`, else the embedded SQLite store."""
    return explicit or os.environ.get(TRACKING_URI_ENV) or (home or Home.from_env()).tracking_uri


def redacted(uri: str) -> str:
    """`uri` as it may be shown or written down: its password (a server's basic auth, a
    database's) as ***."""
    return hide_password(uri, uri)


def hide_password(text: str, uri: str) -> str:
    """`text` (a message that may quote `uri`) with `uri`'s password as ***."""
    try:
        password = urllib.parse.urlsplit(uri).password
    except ValueError:  # a URI beyond parsing: cut everything between "//" and "@"
        return re.sub(r"//[^/@\s]*@", "//***@", text)
    return text.replace(f":{password}@", ":***@") if password else text


def check_tracking_uri(uri: str) -> None:
    """UsageError for a URI MLflow would fail on mid-command, with a traceback: a bad port, a
    database store whose driver is not installed."""
    try:
        urllib.parse.urlsplit(uri).port  # noqa: B018 - parses host, port
    except ValueError as e:
        raise UsageError(f"tracking URI {redacted(uri)!r}: {e}") from None
    _check_database_driver(uri)


def _check_database_driver(uri: str) -> None:
    """A database store's driver must be installed; MLflow would fail on its first query, with
    an ImportError traceback. The message names the scheme, never the URI: it holds passwords."""
    scheme = uri.partition("://")[0]
    if scheme.split("+")[0] not in DATABASE_SCHEMES:
        return
    from sqlalchemy.engine import make_url

    try:
        make_url(uri).get_dialect().import_dbapi()
    except ImportError as e:
        if e.name and importlib.util.find_spec(e.name.split(".")[0]) is None:
            package = DRIVER_PACKAGES.get(e.name, e.name)
            raise UsageError(
                f"tracking URI scheme {scheme!r} needs the database driver {e.name!r}, which is "
                f"not installed: pip install '{package}' into this environment"
            ) from None
        # Installed but unusable, e.g. psycopg without libpq: its own first line says why.
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"tracking URI scheme {scheme!r}: its database driver failed to import: {reason}"
        ) from None


def check_server_answers(uri: str) -> None:
    """A tracking server that takes connections but never answers would hold every MLflow call
    for its timeout and retries (3 x 30 s); one short probe says so in seconds. Only silence
    fails it: any HTTP answer (even a proxy's 401) or another error is left to MLflow."""
    if urllib.parse.urlsplit(uri).scheme not in ("http", "https"):
        return
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S)
    except requests.Timeout:
        raise MlflowException(
            f"no answer to GET /health in {PROBE_TIMEOUT_S} s", TEMPORARILY_UNAVAILABLE
        ) from None
    except requests.RequestException:
        pass


def artifact_root(uri: str, home: Home) -> Path | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store's file (so the
    embedded store's are the data home's `mlartifacts/`), in the data home for other
    databases, and wherever a server or a file store puts them (None). Left to MLflow, a
    database store would write them to `./mlruns` in whatever folder the process runs in."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme in ("file", "http", "https", "databricks"):
        return None
    if scheme == "sqlite":
        return Path(rest.removeprefix("/")).resolve().parent / "mlartifacts"
    return home.artifacts


def is_missing(error) -> bool:
    """MLflow's "not found", as opposed to a store that failed to answer (a timeout, a 5xx):
    that must not read as a missing adapter."""
    return error.error_code == "RESOURCE_DOES_NOT_EXIST"
