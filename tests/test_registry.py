"""The adapter registry on an embedded SQLite store and on a real `mlflow server`."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from registry.errors import (
    AdapterError,
    BaseMismatchError,
    NotFoundError,
    UnknownAdapterError,
    UsageError,
)
from registry.lineage import Lineage
from registry.refs import AdapterRef, parse_ref
from registry.resolve import resolve_adapter
from registry.store import AdapterRegistry
from tests.helpers import make_adapter, register_folder, run_cli


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [
        make_adapter(tiny_base, root / f"v{i}", name="facts", rank=rank, seed=i)
        for i, rank in enumerate((4, 8))
    ]


def _exercise(registry: AdapterRegistry, adapters, tmp_path, tiny_base):
    assert [register_folder(registry, folder, "facts") for folder in adapters] == [1, 2]

    [listed] = registry.list()
    assert (listed.name, listed.latest_version, listed.aliases) == ("facts", 2, {})

    latest = registry.get(parse_ref("facts"))
    assert latest.version == 2
    assert latest.tags["rank"] == "8"
    assert latest.tags["base_fingerprint"] == tiny_base.fingerprint
    assert latest.tags["target_modules"] == "q_proj,v_proj"
    assert latest.run_id

    time.sleep(0.01)  # MLflow's clock is in milliseconds
    assert registry.promote("facts", 1) is None
    assert registry.get(parse_ref("facts@champion")).version == 1
    [promoted] = registry.list()
    assert promoted.updated > listed.updated  # `registry list` shows when it moved
    assert registry.promote("facts", 2) == 1
    assert registry.get(parse_ref("facts@champion")).version == 2
    assert "former_champion" in registry.get(parse_ref("facts/1")).tags

    # The same run registering again (a resumed run) gets its version back
    again = registry.register("facts", latest.run_id, latest.source, Lineage.read(adapters[1]))
    assert again.version == 2 and registry.get(parse_ref("facts")).version == 2

    # The version it copies is the one it returns (the CLI prints), though the alias moves
    # just after the reference is resolved (another user's promote).
    get, dest = registry.get, tmp_path / "champion"

    def get_then_move(ref):
        version = get(ref)
        registry.get = get  # promote resolves too
        registry.promote("facts", 1)
        return version

    registry.get = get_then_move
    try:
        copied = registry.download(parse_ref("facts@champion"), dest)
    finally:
        vars(registry).pop("get", None)
        registry.promote("facts", 2)
    assert copied.version == 2
    original = adapters[1]
    assert (dest / "adapter_model.safetensors").read_bytes() == (
        original / "adapter_model.safetensors"
    ).read_bytes()
    assert Lineage.read(dest) == Lineage.read(original)

    resolved = resolve_adapter(
        "facts/1",
        base_fingerprint=tiny_base.fingerprint,
        tracking_uri=registry.tracking_uri,
        home=registry.home,
    )
    assert resolved.version.version == 1
    assert json.loads((resolved.path / "adapter_config.json").read_text())["r"] == 4


def test_register_promote_download_on_sqlite(registry, adapters, tmp_path, tiny_base):
    _exercise(registry, adapters, tmp_path, tiny_base)
    # Artifacts live beside the store's file, not in ./mlruns of whatever folder ran this.
    assert registry.get(parse_ref("facts/1")).source.startswith((tmp_path / "mlartifacts").as_uri())


def test_register_promote_download_on_a_real_mlflow_server(
    mlflow_server, home, adapters, tmp_path, tiny_base
):
    registry = AdapterRegistry(mlflow_server, home)
    _exercise(registry, adapters, tmp_path, tiny_base)
    # The CLI talks to the same server through --tracking-uri.
    result = run_cli("registry", "list", "--tracking-uri", mlflow_server)
    assert result.returncode == 0, result.stderr
    assert "facts" in result.stdout
    assert "champion→2" in result.stdout
    # The server says "not found" as the SQLite store does, and it is told apart from a failure.
    with pytest.raises(UnknownAdapterError, match="no registered adapter named 'other'"):
        registry.get(parse_ref("other"))
    with pytest.raises(NotFoundError, match="has no alias 'staging'"):
        registry.get(parse_ref("facts@staging"))
    # A team's server behind basic auth: its password is never in a message.
    with_password = mlflow_server.replace("http://", "http://alice:s3cret@")
    with pytest.raises(UnknownAdapterError) as error:
        AdapterRegistry(with_password, home).get(parse_ref("other"))
    assert "in http://alice:***@" in str(error.value) and "s3cret" not in str(error.value)


def test_the_cli_shows_mlflow_info_lines_only_with_verbose(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)  # an in-process CLI run sets it
    quiet = run_cli("registry", "list", env={"LORAPLEX_HOME": str(tmp_path / "a")})
    loud = run_cli("-v", "registry", "list", env={"LORAPLEX_HOME": str(tmp_path / "b")})
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    # Each run creates a new store's tables; only -v says so.
    assert "Creating initial MLflow database tables" in loud.stderr
    assert "mlflow" not in quiet.stderr.lower(), quiet.stderr


def test_unknown_names_versions_and_aliases_are_named(registry, adapters):
    register_folder(registry, adapters[0], "facts")
    with pytest.raises(NotFoundError, match=r"no registered adapter named 'fact' .*mean facts\?"):
        registry.get(parse_ref("fact"))
    with pytest.raises(NotFoundError, match=r"named 'zzz' .*\(registered: facts\)"):
        registry.get(parse_ref("zzz"))
    with pytest.raises(NotFoundError, match=r"no version 5 \(versions: 1\)"):
        registry.get(parse_ref("facts/5"))
    with pytest.raises(NotFoundError, match=r"no alias 'champion' \(aliases: none\)"):
        registry.get(parse_ref("facts@champion"))
    with pytest.raises(NotFoundError, match="no version 9"):
        registry.promote("facts", 9)


def test_an_unknown_name_that_is_a_folder_here_says_how_to_write_the_folder(
    registry, adapters, tmp_path, monkeypatch
):
    from registry.resolve import resolve_adapter

    register_folder(registry, adapters[0], "facts")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(adapters[0], tmp_path / "out")
    with pytest.raises(NotFoundError, match=r"named 'out' .*\(the folder is written './out'\)"):
        resolve_adapter("out", tracking_uri=registry.tracking_uri, home=registry.home)
    assert resolve_adapter("./out").path == tmp_path / "out"


def test_a_download_cut_short_leaves_no_half_folder_and_the_next_one_works(
    registry, adapters, tmp_path, monkeypatch
):
    import shutil

    from registry import store

    register_folder(registry, adapters[0], "facts")
    copy = shutil.copytree

    def disk_full(source, dest, **kwargs):
        (Path(dest) / "adapter_config.json").write_text("{")
        raise shutil.Error([(str(source), str(dest), "[Errno 28] No space left on device")])

    monkeypatch.setattr(store.shutil, "copytree", disk_full)
    theirs = tmp_path / "dl" / "notes.partial-2019"  # the user's, named like our leftovers
    theirs.mkdir(parents=True)
    os.utime(theirs, (0, 0))
    with pytest.raises(UsageError, match=r"download destination .*: \[Errno 28\] No space left"):
        registry.download(AdapterRef("facts"), tmp_path / "dl" / "out")
    assert list((tmp_path / "dl").iterdir()) == [theirs]  # nothing half-copied; theirs kept
    monkeypatch.setattr(store.shutil, "copytree", copy)
    registry.download(AdapterRef("facts"), tmp_path / "dl" / "out")
    assert theirs.is_dir()
    assert sorted(p.name for p in (tmp_path / "dl" / "out").iterdir()) == sorted(
        p.name for p in adapters[0].iterdir()
    )


def test_promote_takes_a_name_and_says_so_for_a_reference(registry, adapters):
    from typer.testing import CliRunner

    from registry.app import app

    register_folder(registry, adapters[0], "facts")
    uri = ["--tracking-uri", registry.tracking_uri]
    for name in ("facts/1", "facts@champion"):
        result = CliRunner().invoke(app, ["registry", "promote", name, "1", *uri])
        assert result.exit_code == 2
        assert result.output == (
            f"error: {name!r}: promote takes NAME VERSION, e.g. 'promote faq 3'\n"
        )
    assert registry.get(parse_ref("facts/1")).aliases == []


def test_download_refuses_a_non_empty_destination(registry, adapters, tmp_path):
    register_folder(registry, adapters[0], "facts")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="exists and is not an empty folder"):
        registry.download(AdapterRef("facts"), tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(UsageError, match="exists and is not an empty folder"):
        registry.download(AdapterRef("facts"), tmp_path / "a-file")


def test_a_lineage_file_that_is_corrupt_is_refused_and_one_with_newer_keys_loads(
    adapters, tmp_path
):
    folder = tmp_path / "newer"
    shutil.copytree(adapters[0], folder)
    lineage = json.loads((folder / "loraplex.json").read_text())
    (folder / "loraplex.json").write_text(json.dumps({**lineage, "created_by": "loraplex 0.9"}))
    assert resolve_adapter(str(folder)).lineage.data_hash == lineage["data_hash"]
    corrupt_files = (
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"name": "x"}),
        json.dumps({**lineage, "tokenizer": ["sha256:0"]}),
        b'{"\xe9"}',
    )
    for corrupt in corrupt_files:  # the last is Latin-1, not UTF-8: it was a 500 in a server
        file = folder / "loraplex.json"
        file.write_bytes(corrupt) if isinstance(corrupt, bytes) else file.write_text(corrupt)
        with pytest.raises(AdapterError, match="is not a loraplex lineage file"):
            resolve_adapter(str(folder))


def test_folder_adapter_resolves_and_mismatched_base_is_refused(adapters, smollm2, tiny_base):
    resolved = resolve_adapter(str(adapters[0]), base_fingerprint=tiny_base.fingerprint)
    assert resolved.path == adapters[0].resolve() and resolved.version is None
    with pytest.raises(BaseMismatchError, match=r"trained on base .* not on this base"):
        resolve_adapter(str(adapters[0]), base_fingerprint=smollm2.fingerprint)


def test_non_adapter_folders_are_refused(tmp_path, adapters):
    with pytest.raises(AdapterError, match=r"no adapter_config\.json"):
        resolve_adapter(str(tmp_path))
    ia3 = tmp_path / "ia3"
    shutil.copytree(adapters[0], ia3)
    config = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="is a IA3 adapter"):
        resolve_adapter(str(ia3))
    with pytest.raises(NotFoundError, match="no such folder"):
        resolve_adapter(str(tmp_path / "missing"))


def test_an_unreachable_tracking_server_is_one_line_naming_it_and_exit_2(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://alice:s3cret@127.0.0.1:{s.getsockname()[1]}"
    env = {"LORAPLEX_HOME": str(tmp_path)}  # loraplex's own retry limits: seconds, not minutes
    result = run_cli("registry", "list", "--tracking-uri", nowhere, env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: MLflow at {nowhere.replace('s3cret', '***')}: ")
    assert "s3cret" not in line  # MLflow's own message quotes the URL too


def test_a_tracking_server_that_never_answers_fails_in_seconds_not_minutes(tmp_path):
    import socket

    from registry.tracking import PROBE_TIMEOUT_S

    with socket.socket() as silent:  # the kernel takes connections; nothing ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        env = {"LORAPLEX_HOME": str(tmp_path)}
        result = run_cli("registry", "list", "--tracking-uri", uri, env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line == f"error: MLflow at {uri}: no answer to GET /health in {PROBE_TIMEOUT_S} s"


@pytest.mark.parametrize("alias", ["latest", "v1", "V2", "has space"])
def test_promote_refuses_reserved_and_malformed_aliases_with_exit_2(registry, adapters, alias):
    from typer.testing import CliRunner

    from registry.app import app

    register_folder(registry, adapters[0], "facts")
    args = ["registry", "promote", "facts", "1", "--alias", alias]
    result = CliRunner().invoke(app, [*args, "--tracking-uri", registry.tracking_uri])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: alias '{alias}' ")
    assert registry.get(parse_ref("facts/1")).aliases == []


def test_list_reads_every_page_past_mlflows_100_models(registry):
    for i in range(105):
        registry.client.create_registered_model(f"m{i:03d}")
    assert [a.name for a in registry.list()] == [f"m{i:03d}" for i in range(105)]
    with pytest.raises(NotFoundError) as unknown:  # a typo listed all 105 (17,000 characters
        registry.get(parse_ref("zzz"))  # with 1,000)
    listed = ", ".join(f"m{i:03d}" for i in range(20))
    assert str(unknown.value).endswith(f"(registered: {listed} and 85 more)")


def test_a_version_registered_again_after_its_model_was_deleted_is_not_served_from_cache(
    registry, adapters
):
    assert register_folder(registry, adapters[0], "facts") == 1
    first = registry.fetch_version(registry.get(parse_ref("facts/1")))
    assert json.loads((first / "adapter_config.json").read_text())["r"] == 4
    registry.client.delete_registered_model("facts")
    assert register_folder(registry, adapters[1], "facts") == 1  # version 1 again, rank 8
    again = registry.fetch_version(registry.get(parse_ref("facts/1")))
    assert json.loads((again / "adapter_config.json").read_text())["r"] == 8
    # and cached from then on
    assert registry.fetch_version(registry.get(parse_ref("facts/1"))) == again


def test_an_alias_moved_while_resolving_gives_one_versions_number_and_folder(
    registry, adapters, monkeypatch
):
    assert [register_folder(registry, folder, "facts") for folder in adapters] == [1, 2]
    registry.promote("facts", 1)
    looked_up = AdapterRegistry.get

    def promoted_meanwhile(self, ref):  # `loraplex registry promote facts 2` lands now
        version = looked_up(self, ref)
        monkeypatch.setattr(AdapterRegistry, "get", looked_up)
        self.promote("facts", 2)
        return version

    monkeypatch.setattr(AdapterRegistry, "get", promoted_meanwhile)
    resolved = resolve_adapter(
        "facts@champion", tracking_uri=registry.tracking_uri, home=registry.home
    )
    # Version 1's number had version 2's folder: its uid, slot and prefix cache meant both.
    assert resolved.version.version == 1
    assert json.loads((resolved.path / "adapter_config.json").read_text())["r"] == 4


def test_two_downloads_of_one_version_at_once_both_get_it(registry, adapters, monkeypatch):
    import concurrent.futures
    import threading

    import mlflow.artifacts

    assert register_folder(registry, adapters[1], "facts") == 1
    downloading, download = threading.Barrier(2, timeout=30), mlflow.artifacts.download_artifacts

    def together(**kwargs):  # both calls are inside the download at once, as from a remote store
        downloading.wait()
        return download(**kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", together)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # e.g. `facts/1`, `facts@champion`
        version = registry.get(parse_ref("facts/1"))
        calls = [pool.submit(registry.fetch_version, version) for _ in range(2)]
        paths = [call.result() for call in calls]  # one undid the other's folder: OSError
    assert paths[0] == paths[1]
    assert json.loads((paths[0] / "adapter_config.json").read_text())["r"] == 8
    assert [p.name for p in paths[0].parent.iterdir()] == [paths[0].name]  # no partial left


def test_a_download_abandoned_by_a_killed_process_is_removed_by_a_later_fetch(registry, adapters):
    import os

    from registry.atomic import ABANDONED_SECONDS

    assert register_folder(registry, adapters[1], "facts") == 1
    assert register_folder(registry, adapters[1], "facts") == 2
    folder = registry.fetch_version(registry.get(parse_ref("facts/1"))).parent
    abandoned, live = folder / "2-x.partial-killed", folder / "2-x.partial-downloading"
    for partial in (abandoned, live):
        partial.mkdir()
        (partial / "adapter_model.safetensors").write_bytes(b"half")
    old = time.time() - ABANDONED_SECONDS - 60
    os.utime(abandoned, (old, old))
    registry.fetch_version(registry.get(parse_ref("facts/2")))
    assert not abandoned.exists()
    assert live.exists()  # perhaps another process's download in flight


def test_a_download_under_a_file_and_a_malformed_tracking_uri_are_usage_errors(
    registry, adapters, tmp_path
):
    assert register_folder(registry, adapters[1], "facts") == 1
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UsageError, match=r"download destination .*a-file/sub: .*a-file is a file"):
        registry.download(parse_ref("facts/1"), tmp_path / "a-file" / "sub")
    for uri, reason in (
        ("http://[::1", "Invalid IPv6 URL"),
        ("http://h:99999", "out of range"),
        ("postgresql://loraplex:dbs3cret@db:99999/mlflow", "out of range"),
    ):
        with pytest.raises(UsageError, match=f"tracking URI .*{reason}") as error:
            AdapterRegistry(uri, registry.home)
        assert "s3cret" not in str(error.value)


@pytest.mark.parametrize(
    "uri, driver",
    [
        ("postgresql://u:secret@127.0.0.1:1/db", "psycopg"),
        ("mysql+pymysql://u:secret@h/db", "pymysql"),
    ],
)
def test_a_database_uri_whose_driver_is_missing_is_a_usage_error_without_its_password(
    registry, uri, driver
):
    if importlib.util.find_spec(driver):
        pytest.skip(f"{driver} is installed here")
    with pytest.raises(UsageError, match=f"needs the database driver '{driver}'") as refused:
        AdapterRegistry(uri, registry.home)
    assert "secret" not in str(refused.value)


def test_a_store_that_fails_to_answer_is_its_error_not_an_unknown_adapter(
    registry, adapters, monkeypatch
):
    from mlflow.exceptions import MlflowException

    register_folder(registry, adapters[1], "facts")
    registry.promote("facts", 1)
    unavailable = MlflowException("503 from the tracking server", "TEMPORARILY_UNAVAILABLE")

    def fails(*args, **kwargs):
        raise unavailable

    calls = [
        ("get_registered_model", "facts@champion"),
        ("get_model_version", "facts@champion"),
        ("get_model_version", "facts/1"),
        ("search_model_versions", "facts"),  # the latest
    ]
    for method, ref in calls:
        with monkeypatch.context() as patch:
            patch.setattr(registry.client, method, fails)
            with pytest.raises(MlflowException, match="503 from the tracking server"):
                registry.get(parse_ref(ref))
    with pytest.raises(UnknownAdapterError, match="no registered adapter named 'other'"):
        registry.get(parse_ref("other"))
    with pytest.raises(NotFoundError, match="has no alias 'staging'"):
        registry.get(parse_ref("facts@staging"))


def test_a_version_got_by_number_name_or_alias_carries_its_aliases(registry, adapters):
    for _ in range(2):
        register_folder(registry, adapters[1], "facts")
    registry.promote("facts", 1)
    registry.promote("facts", 1, "stable")
    registry.promote("facts", 2, "canary")
    for ref in ("facts/1", "facts@champion", "facts@stable"):
        assert registry.get(parse_ref(ref)).aliases == ["champion", "stable"], ref
    assert registry.get(parse_ref("facts")).aliases == ["canary"]  # the latest, 2
    assert [v.aliases for v in registry.versions("facts")] == [["champion", "stable"], ["canary"]]
    shown = run_cli("registry", "show", "facts/1", "--tracking-uri", registry.tracking_uri)
    assert re.search(r"aliases\s*│\s*champion, stable", shown.stdout), shown.stdout + shown.stderr


def test_a_database_driver_that_is_installed_but_fails_to_import_says_why(
    registry, tmp_path, monkeypatch
):
    broken = tmp_path / "site" / "psycopg"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("no pq wrapper available.\\nmore")')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(UsageError, match=r"driver failed to import: no pq wrapper available\.$"):
        AdapterRegistry("postgresql://u:secret@127.0.0.1:1/db", registry.home)


def test_one_registry_waiting_for_its_server_holds_up_no_other(tmp_path, monkeypatch):
    """Each registry makes its MLflow client under its own lock: the server makes one per
    load, and one load waiting 10 s for a hung registry must not hold up the rest (as a
    cached_property's lock, one per class on Python 3.11, did)."""
    import threading

    from registry import tracking
    from registry.home import Home

    hung, entered = threading.Event(), threading.Event()

    def probe(uri: str) -> None:
        if "hung" in uri:
            entered.set()
            hung.wait(30)

    monkeypatch.setattr(tracking, "check_server_answers", probe)
    home = Home(tmp_path)
    waiting = threading.Thread(target=lambda: AdapterRegistry("http://hung:5000", home).client)
    waiting.start()
    assert entered.wait(10)
    made = threading.Event()
    other = AdapterRegistry("http://other:5000", home)
    threading.Thread(target=lambda: (other.client, made.set()), daemon=True).start()
    try:
        assert made.wait(10)  # while the other still waits for its server
    finally:
        hung.set()
        waiting.join()


def test_a_new_adapter_or_experiment_another_run_creates_meanwhile_is_used_not_an_error(
    registry, adapters, monkeypatch
):
    """Two trainings of a new adapter at once both found it missing, and the second to create
    it failed after its whole training (MLflow's RESOURCE_ALREADY_EXISTS)."""
    register_folder(registry, adapters[0], "raced")
    experiment = registry.experiment_id("raced-runs")
    monkeypatch.setattr(registry, "_exists", lambda name: False)  # as found before the other
    real = registry.client.get_experiment_by_name
    calls = []

    def missing_at_first(name):
        calls.append(name)
        return None if len(calls) == 1 else real(name)

    monkeypatch.setattr(registry.client, "get_experiment_by_name", missing_at_first)
    assert registry.experiment_id("raced-runs") == experiment
    assert register_folder(registry, adapters[0], "raced") == 2


def test_two_commands_on_a_fresh_data_home_at_once_both_work(tmp_path):
    """MLflow makes the embedded store's tables on first use: the second command at once
    failed with sqlite3's "table ... already exists" (a traceback, exit 1)."""
    from concurrent.futures import ThreadPoolExecutor

    env = {"LORAPLEX_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: run_cli("registry", "list", env=env), range(2)))
    assert [run.returncode for run in runs] == [0, 0], [run.stderr for run in runs]


def test_a_failed_download_says_its_cause_not_only_mlflows_heading():
    """MLflow's first line only announces the failures ("...artifacts from URI:"); the
    cause, the one thing to act on, was cut off."""
    from registry.console import _first_line

    message = (
        "The following failures occurred while downloading one or more artifacts from "
        "http://h/api/2.0/mlflow-artifacts/artifacts:\n##### File adapter #####\n"
        "No such artifact: 'adapter'\n##### File other #####\nsecond failure"
    )
    assert _first_line(message).endswith("artifacts: No such artifact: 'adapter'")
    assert _first_line("RESOURCE_DOES_NOT_EXIST: gone\ndetails") == "RESOURCE_DOES_NOT_EXIST: gone"


def test_promote_refuses_a_version_past_what_a_reference_can_name(registry):
    from typer.testing import CliRunner

    from registry.app import app

    args = ["registry", "promote", "facts", str(10**19), "--tracking-uri", registry.tracking_uri]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    said = " ".join(result.output.replace("│", " ").split())
    assert "Invalid value for 'version': Input should be less than or equal to 9999" in said


def test_prune_cache_removes_downloads_no_load_read_for_the_given_days(
    adapters, tracking_uri, tmp_path
):
    import os

    from registry.atomic import ABANDONED_SECONDS
    from registry.home import Home

    home = Home(tmp_path / "home")
    registry = AdapterRegistry(tracking_uri, home)
    for _ in range(3):
        register_folder(registry, adapters[0], "facts")
    folders = [registry.fetch_version(registry.get(parse_ref(f"facts/{v}"))) for v in (1, 2, 3)]
    days_ago = time.time() - 3 * 86400
    for folder in folders:
        os.utime(folder, (days_ago, days_ago))
    assert registry.fetch_version(registry.get(parse_ref("facts/2"))) == folders[1]  # read now
    abandoned, live = folders[0].parent / "4-x.partial-killed", folders[0].parent / "5-x.partial-y"
    for partial in (abandoned, live):
        partial.mkdir()
        (partial / "adapter_model.safetensors").write_bytes(b"half")
    old = time.time() - ABANDONED_SECONDS - 60
    os.utime(abandoned, (old, old))
    size = sum(f.stat().st_size for f in folders[0].rglob("*") if f.is_file())

    result = run_cli(
        "registry", "prune-cache", "--unused-days", "2", env={"LORAPLEX_HOME": str(home.root)}
    )
    assert result.returncode == 0, result.stderr
    assert [f.exists() for f in folders] == [False, True, False]
    assert not abandoned.exists() and live.exists()  # perhaps a download in flight
    assert result.stdout.startswith(f"removed 2 downloaded version(s), {2 * size / 2**20:.1f} MB")
    assert "kept 1" in result.stdout
    # what was pruned downloads again when a load asks for it
    assert (
        registry.fetch_version(registry.get(parse_ref("facts/1"))) / "adapter_config.json"
    ).is_file()

    shutil.rmtree(live)
    assert (
        run_cli(
            "registry", "prune-cache", "--unused-days", "0", env={"LORAPLEX_HOME": str(home.root)}
        ).returncode
        == 0
    )
    assert not any(home.adapters.glob("*/*/*"))  # the store and name folders stay


def test_delete_removes_one_version_and_refuses_one_an_alias_points_at(
    registry, adapters, monkeypatch
):
    from typer.testing import CliRunner

    from registry import cli
    from registry.app import app

    for _ in range(2):
        register_folder(registry, adapters[0], "gone")
    registry.promote("gone", 1)
    uri = ["--tracking-uri", registry.tracking_uri]

    def delete(*args: str, answer: str = ""):
        return CliRunner().invoke(app, ["registry", "delete", *args, *uri], input=answer)

    unasked = delete("gone/2")  # no terminal to ask on
    assert unasked.exit_code == 2 and "no terminal to confirm on: pass --yes" in unasked.output
    held = delete("gone/1")  # refused before any prompt
    assert held.exit_code == 2
    assert "gone/1 holds the alias(es) champion: promote another version" in held.output
    assert delete("gone", "--yes").exit_code == 2  # a version must be named
    monkeypatch.setattr(cli, "_can_ask", lambda: True)
    declined = delete("gone/2", answer="n\n")
    assert declined.exit_code == 1 and registry.get(parse_ref("gone/2")).version == 2
    assert delete("gone/2", answer="y\n").output.endswith("deleted gone/2\n")
    forced = delete("gone/1", "--yes", "--force")
    assert forced.output == "deleted gone/1 (and its alias(es) champion)\n"
    with pytest.raises(NotFoundError, match="has no versions yet"):
        registry.get(parse_ref("gone"))
    register_folder(registry, adapters[0], "gone")  # version 3
    confirm = cli.typer.confirm

    def promoted_while_asking(*args, **kwargs):
        registry.promote("gone", 3)  # another command, while the person reads the prompt
        return confirm(*args, **kwargs)

    monkeypatch.setattr(cli.typer, "confirm", promoted_while_asking)
    late = delete("gone/3", answer="y\n")
    assert late.exit_code == 2 and "gone/3 holds the alias(es) champion" in late.output
    assert registry.get(parse_ref("gone@champion")).version == 3
