"""The adapter registry: registered models and versions in MLflow (SQLite by default, or a server).

Each adapter name is a registered model; each training run that finishes adds a version whose
source is the run's `adapter` artifact folder (PEFT format) and whose tags carry its lineage.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from registry import tracking
from registry.atomic import make_folder
from registry.download_cache import mark_used
from registry.errors import NotFoundError, UnknownAdapterError, UsageError
from registry.home import Home, setup_environment
from registry.lineage import Lineage
from registry.refs import CHAMPION, AdapterRef, check_alias
from registry.tracking import artifact_root, check_tracking_uri, is_missing, resolve_tracking_uri

NAMES_LISTED = 20  # of the registered adapters, in the error for an unknown one


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    version: int
    source: str  # artifact URI of the adapter folder
    run_id: str | None
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    created: float = 0.0  # unix seconds

    @property
    def ref(self) -> str:
        """The reference to exactly this version: `name/3`."""
        return str(AdapterRef(self.name, self.version))


@dataclass(frozen=True)
class RegisteredAdapter:
    name: str
    latest_version: int | None
    aliases: dict[str, int]  # alias -> version
    updated: float  # unix seconds


class AdapterRegistry:
    """Registered adapters in the MLflow store at `tracking_uri`."""

    def __init__(self, tracking_uri: str | None = None, home: Home | None = None):
        self.home = setup_environment(home)  # from Python too: no telemetry, bounded retries
        self.tracking_uri = resolve_tracking_uri(tracking_uri, self.home)
        check_tracking_uri(self.tracking_uri)
        self._client = None
        self._client_lock = threading.Lock()

    @property
    def client(self):
        """MLflow's client, made on first use (after a server's /health answers). Not a
        cached_property: on Python 3.11 that holds one lock for every instance, so each
        server load's probe of a hung registry (10 s) would wait for all the others'."""
        with self._client_lock:
            if self._client is None:
                from mlflow import MlflowClient

                tracking.check_server_answers(self.tracking_uri)
                uri = self.tracking_uri
                if not self.is_embedded:
                    self._client = MlflowClient(tracking_uri=uri, registry_uri=uri)
                    return self._client
                self.home.create()
                # MLflow makes a new SQLite store's tables as its client starts: two commands
                # on a fresh data home at once, and one failed ("table already exists").
                with FileLock(self.home.root / "mlflow.db.lock"):
                    self._client = MlflowClient(tracking_uri=uri, registry_uri=uri)
                    self._client.search_registered_models(max_results=1)  # its registry's too
            return self._client

    @property
    def is_embedded(self) -> bool:
        return self.tracking_uri == self.home.tracking_uri

    def experiment_id(self, name: str) -> str:
        """The experiment's id, created on first use (artifacts in the data home if embedded)."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        root = artifact_root(self.tracking_uri, self.home)
        location = (root / name).as_uri() if root else None
        with _made_meanwhile_is_fine():  # another run's first training created it
            return self.client.create_experiment(name, artifact_location=location)
        return self.client.get_experiment_by_name(name).experiment_id

    def register(self, name: str, run_id: str, source: str, lineage: Lineage) -> AdapterVersion:
        """Add a version of `name` whose weights are the artifact folder at `source`."""
        # mlflow.register_model fails for plain artifact folders in MLflow 3 and leaves an empty
        # registered model behind: create the version directly, linked to its run.
        if not self._exists(name):
            with _made_meanwhile_is_fine():  # by another run of the same adapter
                self.client.create_registered_model(
                    name, description=f"LoRA adapter over {lineage.base_model}"
                )
        # A run registers once: a resumed run whose registration got as far as the version
        # (and failed after it) gets that version back, not a second copy.
        for v in self.client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'"):
            if v.source == source:
                return self.get(AdapterRef(name, int(v.version)))
        created = self.client.create_model_version(
            name, source=source, run_id=run_id, tags=lineage.tags()
        )
        return self.get(AdapterRef(name, int(created.version)))

    def list(self) -> list[RegisteredAdapter]:
        adapters = []
        for model in self._registered_models():
            versions = [int(v.version) for v in model.latest_versions or []]
            aliases = {alias: int(v) for alias, v in (model.aliases or {}).items()}
            adapters.append(
                RegisteredAdapter(
                    name=model.name,
                    latest_version=max(versions) if versions else None,
                    aliases=aliases,
                    updated=(model.last_updated_timestamp or 0) / 1000,
                )
            )
        return adapters

    def _registered_models(self):
        """Every registered model by name: MLflow answers a page (at most 100) per call."""
        token = None
        while True:
            page = self.client.search_registered_models(order_by=["name ASC"], page_token=token)
            yield from page
            token = page.token
            if not token:
                return

    def versions(self, name: str) -> list[AdapterVersion]:
        return self._versions(self._registered(name))

    def run_params(self, version: AdapterVersion) -> dict[str, str]:
        """The params of the run that trained `version` (its resolved config, flattened); empty
        for a version registered without a run."""
        if version.run_id is None:
            return {}
        return dict(self.client.get_run(version.run_id).data.params)

    def get(self, ref: AdapterRef) -> AdapterVersion:
        """The version a reference points at; NotFoundError names what is missing."""
        model = self._registered(ref.name)
        number = ref.version
        if ref.alias is not None:
            aliases = model.aliases or {}
            if ref.alias not in aliases:
                raise NotFoundError(
                    f"adapter {ref.name!r} has no alias {ref.alias!r} "
                    f"(aliases: {_names(sorted(aliases))})"
                )
            number = int(aliases[ref.alias])
        # One version read, not all of them: a server's alias watch asks every few seconds.
        found = self._version_entity(model.name, number)
        if found is not None:
            return self._with_aliases(model, [found])[0]
        versions = self._versions(model)  # for the error, which lists them
        if not versions:
            raise NotFoundError(f"adapter {ref.name!r} has no versions yet")
        raise NotFoundError(
            f"adapter {ref.name!r} has no version {number} "
            f"(versions: {', '.join(str(v.version) for v in versions)})"
        )

    def _version_entity(self, name: str, number: int | None):
        """MLflow's version `number` of `name` (None: the latest), or None if there is none."""
        from mlflow.exceptions import MlflowException

        if number is None:
            latest = self.client.search_model_versions(
                f"name = '{name}'", max_results=1, order_by=["version_number DESC"]
            )
            return latest[0] if latest else None
        try:
            return self.client.get_model_version(name, str(number))
        except MlflowException as e:
            if not is_missing(e):
                raise
        return None

    def promote(self, name: str, version: int, alias: str = CHAMPION) -> int | None:
        """Point `alias` at `version`; returns the version that held it before, if any."""
        check_alias(alias)
        target = self.get(AdapterRef(name, version))
        try:
            previous = self.get(AdapterRef(name, alias=alias)).version
        except NotFoundError:
            previous = None
        self.client.set_registered_model_alias(name, alias, str(target.version))
        if previous is not None and previous != target.version:
            # The former holder keeps a record, so the history of promotions survives the move
            # (written after it: a move that failed leaves no record of one).
            self.client.set_model_version_tag(
                name,
                str(previous),
                f"former_{alias}",
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
        # MLflow leaves the model's last-updated time alone when an alias moves; rewriting its
        # (unchanged) description sets it, so `registry list` shows the promotion.
        model = self.client.get_registered_model(name)
        self.client.update_registered_model(name, model.description)
        return previous

    def deletable(self, name: str, version: int, force: bool = False) -> AdapterVersion:
        """The version `delete` would delete; refused while an alias points at it, unless
        `force` (the aliases go with it: a server following one keeps serving what it
        loaded, and warns)."""
        target = self.get(AdapterRef(name, version))
        if target.aliases and not force:
            raise UsageError(
                f"{target.ref} holds the alias(es) {_names(target.aliases)}: promote another "
                "version first, or delete it with --force"
            )
        return target

    def delete(self, version: AdapterVersion) -> None:
        """Delete one version from the registry; its training run stays in MLflow."""
        self.client.delete_model_version(version.name, str(version.version))

    def record_gate(
        self,
        version: AdapterVersion,
        metrics: dict[str, float],
        tags: dict[str, str],
        files: list[Path],
    ) -> None:
        """A gate's outcome: metrics and report `files` (under `gate/`) on the version's
        training run, tags on the version itself (so `registry show` and searches see it)."""
        for key, value in tags.items():
            self.client.set_model_version_tag(version.name, str(version.version), key, value)
        if version.run_id is None:
            return
        for key, value in metrics.items():
            self.client.log_metric(version.run_id, key, value)
        for file in files:  # these alone, not the rest of their folder (`--output .`)
            self.client.log_artifact(version.run_id, str(file), "gate")

    def download(self, ref: AdapterRef, dest: Path) -> AdapterVersion:
        """Copy the adapter folder of the version `ref` names to `dest` (created; must be
        empty if it exists); that version (`ref` is resolved once: an alias may move)."""
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise UsageError(f"download destination {dest} exists and is not an empty folder")
        version = self.get(ref)
        source = self.fetch_version(version)
        try:  # whole or not at all: a copy cut short (a full disk) leaves nothing
            if dest.is_dir():  # empty: taken whole by a rename into it
                dest.rmdir()
            copy = functools.partial(shutil.copytree, source, dirs_exist_ok=True)
            make_folder(dest, copy, sweep=False)  # the user's folder: theirs to tidy
        except FileExistsError as e:  # a file where a folder of its path should be
            raise UsageError(f"download destination {dest}: {e.filename} is a file") from None
        except shutil.Error as e:  # copytree's: a list of (source, destination, why)
            why = e.args[0][0][2] if e.args and e.args[0] else e
            raise UsageError(f"download destination {dest}: {why}") from None
        except OSError as e:
            raise UsageError(f"download destination {dest}: {e.strerror or e}") from None
        return version

    def fetch_version(self, version: AdapterVersion) -> Path:
        """A local folder holding the version's adapter, downloaded once into the data home.

        Versions are immutable, but a model deleted and registered again numbers its versions
        from 1 anew: the cache is keyed by (store, name, version, run and source). Each call
        downloads into a folder of its own and renames it into place, so two loads of one
        version at once (`faq/1` and `faq@champion`) cannot undo each other's download.
        """
        import mlflow.artifacts

        store = hashlib.sha256(self.tracking_uri.encode()).hexdigest()[:12]
        origin = hashlib.sha256(f"{version.run_id}\n{version.source}".encode()).hexdigest()[:12]
        local = self.home.adapters / store / version.name / f"{version.version}-{origin}"
        if mark_used(local):
            return local

        def download(partial: Path) -> Path:
            return Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=version.source,
                    dst_path=str(partial),
                    tracking_uri=self.tracking_uri,
                )
            )

        return make_folder(local, download)

    def _exists(self, name: str) -> bool:
        return self._lookup(name) is not None

    def _lookup(self, name: str):
        """MLflow's registered model `name`, None if there is none."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(name)
        except MlflowException as e:
            if not is_missing(e):
                raise
        return None

    def _registered(self, name: str):
        """MLflow's registered model `name`; UnknownAdapterError naming those there are."""
        model = self._lookup(name)
        if model is not None:
            return model
        known = [a.name for a in self.list()]
        if close := difflib.get_close_matches(name, known, n=3):
            hint = f"did you mean {_names(close)}?"
        else:  # a few of them: a team's registry may hold thousands
            more = f" and {len(known) - NAMES_LISTED} more" if len(known) > NAMES_LISTED else ""
            hint = f"registered: {_names(known[:NAMES_LISTED])}{more}"
        raise UnknownAdapterError(
            f"no registered adapter named {name!r} in {tracking.redacted(self.tracking_uri)} "
            f"({hint})"
        )

    def _versions(self, model) -> list[AdapterVersion]:
        """Its versions, oldest first."""
        found = self.client.search_model_versions(f"name = '{model.name}'")
        return sorted(self._with_aliases(model, found), key=lambda v: v.version)

    @staticmethod
    def _with_aliases(model, found) -> list[AdapterVersion]:
        """MLflow's versions `found` of `model` with their aliases, which its search leaves out."""
        held: dict[int, list[str]] = {}
        for alias, number in (model.aliases or {}).items():
            held.setdefault(int(number), []).append(alias)
        return [_version(v, held.get(int(v.version), [])) for v in found]


@contextmanager
def _made_meanwhile_is_fine():
    """Ignore MLflow's "already exists" for what another process created since it was found
    missing (two trainings of a new adapter at once): MLflow has no create-if-absent."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _version(v, aliases: list[str]) -> AdapterVersion:
    return AdapterVersion(
        name=v.name,
        version=int(v.version),
        source=v.source,
        run_id=v.run_id,
        aliases=sorted(aliases),
        tags=dict(v.tags or {}),
        created=(v.creation_timestamp or 0) / 1000,
    )


def _names(names: list[str]) -> str:
    return ", ".join(names) if names else "none"
