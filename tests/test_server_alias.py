"""Registry references on the real SmolLM2: `adapter@alias` follows `promote` without a
restart (and a bare name its latest version), a request in flight finishes on the version it
started with, and /v1/models lists registered adapters that are not loaded yet."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time

import httpx
import openai
import pytest

from registry.refs import parse_ref
from serve import LLM
from tests.helpers import (
    make_adapter,
    make_lora,
    paused,
    register_folder,
    running_server,
    tiny_engine_args,
)

QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]
ANSWER = dict(max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
PROMPT = [1, 5, 6, 7, 8, 9, 10, 11]


@pytest.mark.slow
def test_a_promoted_alias_reaches_new_requests_and_one_in_flight_keeps_its_version(
    smollm2, registry, tmp_path
):
    from serve.async_engine import AsyncLLM
    from serve.serve_config import ServeConfig
    from serve.server import create_app

    for seed in (1, 2):
        folder = make_lora(
            smollm2, tmp_path / f"v{seed}", rank=4, targets=["q_proj", "v_proj"], seed=seed
        )
        register_folder(registry, folder, "faq")
    registry.promote("faq", 1)
    # What MLflow takes but a request could not load as listed: a model with no version, names
    # that are no reference or read as another (alias x of faq); and an alias it takes that
    # loraplex reads too.
    client = registry.client
    client.create_registered_model("empty")
    for odd in ("my faq", "faq@x"):
        client.create_registered_model(odd)
        client.create_model_version(odd, registry.get(parse_ref("faq/1")).source)
    client.set_registered_model_alias("faq", "2024-q3", "1")
    llm = LLM(
        base_model=str(smollm2.path),
        quantization=None,
        num_kv_blocks=64,
        max_num_seqs=4,
        tracking_uri=registry.tracking_uri,
    )
    engine = AsyncLLM(llm.engine)
    config = ServeConfig(alias_poll_interval_s=0.2, audit={"path": tmp_path / "audit.jsonl"})
    with running_server(create_app(engine, "smollm2", config)) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)

        def answer(model: str) -> str:
            reply = client.chat.completions.create(model=model, messages=QUESTION, **ANSWER)
            return reply.choices[0].message.content

        def listed() -> dict[str, dict]:
            return {m["id"]: m for m in httpx.get(f"{url}/models").json()["data"]}

        models = listed()
        assert sorted(models) == ["faq", "faq@2024-q3", "faq@champion", "smollm2"]
        assert models["faq"]["loaded"] is False and models["faq@champion"]["loaded"] is False
        v1, v2 = answer("faq/1"), answer("faq/2")
        assert v1 != v2  # the two versions answer differently
        assert answer("faq@champion") == v1 == answer("faq@2024-q3")
        assert listed()["faq@champion"]["version"] == 1

        stream = client.chat.completions.create(
            model="faq@champion", messages=QUESTION, stream=True, **ANSWER
        )
        chunks = iter(stream)
        text = next(chunks).choices[0].delta.content
        with paused(engine):  # the swap lands between two steps of the streaming request
            assert len(engine.engine.requests) == 1  # still generating
            registry.promote("faq", 2)
            deadline = time.monotonic() + 60
            while engine._inbox.qsize() == 0:  # the new version is read, waiting to install
                assert time.monotonic() < deadline, "the alias move was not followed"
                time.sleep(0.05)
        text += "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == v1
        assert answer("faq@champion") == v2
        assert listed()["faq@champion"]["version"] == 2
        # A bare name is the latest version, and follows new registrations the same way.
        assert answer("faq") == v2
        register_folder(registry, tmp_path / "v1", "faq")  # version 3: v1's weights again
        deadline = time.monotonic() + 60
        while listed()["faq"]["version"] != 3:
            assert time.monotonic() < deadline, "the new latest version was not followed"
            time.sleep(0.1)
        assert answer("faq") == v1
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
        assert 'loraplex_adapter_loads_total{reason="alias_moved"} 2.0' in metrics
    engine.shutdown()


@pytest.mark.parametrize("meanwhile", ["unload", "replace"])
def test_an_unload_or_replacement_while_a_moved_alias_is_read_is_not_undone(
    tiny_base, registry, tmp_path, meanwhile
):
    from serve.adapter_watch import AdapterWatch
    from serve.async_engine import AsyncLLM

    for seed in (1, 2):
        folder = make_lora(tiny_base, tmp_path / f"v{seed}", rank=4, targets=["q_proj"], seed=seed)
        register_folder(registry, folder, "faq")
    registry.promote("faq", 1)
    llm = LLM(**tiny_engine_args(tiny_base, registry.tracking_uri))
    engine = AsyncLLM(llm.engine)
    watch = AdapterWatch(engine)
    read, reading = llm.engine.read_adapter, threading.Event()
    allowed = threading.Event()

    def slow_read(name, source):  # as a download from a remote registry: the API acts first
        reading.set()
        assert allowed.wait(30)
        return read(name, source)

    async def main():
        await watch.ensure("faq@champion")
        registry.promote("faq", 2)
        llm.engine.read_adapter = slow_read
        following = asyncio.ensure_future(watch.follow_moves())
        assert await asyncio.to_thread(reading.wait, 30)
        if meanwhile == "unload":  # DELETE /v1/adapters/faq@champion
            await engine.unload_adapter("faq@champion")
        else:  # POST /v1/adapters {"name": "faq@champion", "source": a folder}
            folder = str(tmp_path / "v1")
            pinned = read("faq@champion", folder)
            await asyncio.wrap_future(engine._submit(lambda: llm.engine.install_adapter(pinned)))
        allowed.set()
        return await following

    try:
        assert asyncio.run(main()) == []
        loaded = {name: info.source for name, info in watch.loaded.items()}
        assert loaded == ({} if meanwhile == "unload" else {"faq@champion": str(tmp_path / "v1")})
    finally:
        engine.shutdown()


def test_an_admins_load_while_a_first_use_reads_the_registry_is_not_undone(
    tiny_base, registry, tmp_path
):
    """POST /v1/adapters of `faq@champion` answered 200 while a request's first-use load of
    that name read the registry; the first use then installed over it."""
    from serve.adapter_watch import AdapterWatch
    from serve.async_engine import AsyncLLM

    folder = make_lora(tiny_base, tmp_path / "v1", rank=4, targets=["q_proj"], seed=1)
    register_folder(registry, folder, "faq")
    registry.promote("faq", 1)
    hotfix = make_lora(tiny_base, tmp_path / "hotfix", rank=4, targets=["q_proj"], seed=2)
    llm = LLM(**tiny_engine_args(tiny_base, registry.tracking_uri))
    engine = AsyncLLM(llm.engine)
    watch = AdapterWatch(engine)
    read, reading, allowed = llm.engine.read_adapter, threading.Event(), threading.Event()

    def slow_read(name, source):  # the registry's download is slow; the folder's is not
        if source == "faq@champion":
            reading.set()
            assert allowed.wait(30)
        return read(name, source)

    llm.engine.read_adapter = slow_read

    async def main():
        first_use = asyncio.ensure_future(watch.ensure("faq@champion"))
        assert await asyncio.to_thread(reading.wait, 30)
        admins = await watch.load("faq@champion", str(hotfix))
        allowed.set()
        return admins, await first_use

    try:
        admins, served = asyncio.run(main())
        assert served is admins and watch.loaded["faq@champion"] is admins
        assert admins.source == str(hotfix)
    finally:
        engine.shutdown()


def test_a_followed_reference_whose_model_was_registered_again_serves_the_new_weights(
    tiny_base, registry, tmp_path
):
    """Deleted and registered again, a model numbers its versions from 1 anew: `faq@champion`
    at version 1 both times is still a move, to other weights."""
    from serve import SamplingParams
    from serve.adapter_watch import AdapterWatch
    from serve.async_engine import AsyncLLM

    targets = ("q_proj", "v_proj", "o_proj", "down_proj")
    folders = [
        make_adapter(tiny_base, tmp_path / f"v{seed}", name="faq", seed=seed, targets=targets)
        for seed in (0, 1)
    ]
    llm = LLM(**tiny_engine_args(tiny_base, registry.tracking_uri))
    engine = AsyncLLM(llm.engine)
    watch = AdapterWatch(engine)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    async def answer(ref: str) -> list[int]:
        async for out in engine.generate(PROMPT, greedy, ref):
            last = out
        return last.token_ids

    async def answers() -> list[list[int]]:
        return [await answer("faq@champion"), await answer("faq/1")]

    async def main():
        register_folder(registry, folders[0], "faq")
        registry.promote("faq", 1)
        await watch.ensure("faq@champion")
        await watch.ensure("faq/1")  # a fixed version: its number is reused too
        first, unmoved = await answers(), await watch.follow_moves()
        registry.client.delete_registered_model("faq")
        register_folder(registry, folders[1], "faq")
        registry.promote("faq", 1)
        return first, unmoved, await watch.follow_moves(), await answers()

    try:
        first, unmoved, moved, second = asyncio.run(main())
    finally:
        engine.shutdown()
    alone = LLM(**tiny_engine_args(tiny_base))
    expected = []
    for k, folder in enumerate(folders):
        alone.load_adapter(f"v{k}", str(folder))
        expected.append(alone.generate([PROMPT], greedy, adapters=[f"v{k}"])[0].token_ids)
    assert (unmoved, moved) == ([], ["faq@champion", "faq/1"])
    assert first == [expected[0]] * 2 and second == [expected[1]] * 2
    assert expected[0] != expected[1]


def test_an_alias_moved_to_an_adapter_that_cannot_be_served_is_read_once_not_each_poll(
    tiny_base, registry, tmp_path
):
    """Rank 16 over an engine's max_lora_rank 8: it keeps serving version 1, and it read and
    refused version 2 again every poll, with a warning each time, for as long as the alias
    stayed."""
    from serve.adapter_watch import AdapterWatch
    from serve.async_engine import AsyncLLM

    for version, rank in ((1, 4), (2, 16), (3, 4)):
        folder = make_lora(tiny_base, tmp_path / f"v{version}", rank=rank, targets=["q_proj"])
        register_folder(registry, folder, "faq")
    registry.promote("faq", 1)
    llm = LLM(**tiny_engine_args(tiny_base, registry.tracking_uri))
    engine = AsyncLLM(llm.engine)
    watch = AdapterWatch(engine)
    read, reads = llm.engine.read_adapter, []

    def counted(name, source):
        reads.append(source)
        return read(name, source)

    llm.engine.read_adapter = counted

    async def main():
        await watch.ensure("faq@champion")
        registry.promote("faq", 2)
        polls = [await watch.follow_moves() for _ in range(3)]
        version = watch.loaded["faq@champion"].version
        registry.promote("faq", 3)  # moved on: read again
        return polls, version, await watch.follow_moves()

    try:
        polls, version, moved = asyncio.run(main())
    finally:
        engine.shutdown()
    assert polls == [[], [], []] and version == 1
    assert moved == ["faq@champion"] and watch.loaded["faq@champion"].version == 3
    assert reads == ["faq@champion"] * 3  # first use, version 2 once, version 3


def test_a_version_whose_files_were_deleted_is_not_found_not_a_registry_outage(
    tiny_base, registry, tmp_path
):
    """Its files gone from the artifact store: a 404 for good, not a 503 telling clients to
    retry in 10 s."""
    import shutil
    from pathlib import Path

    from registry.errors import NotFoundError
    from serve.adapter_watch import AdapterWatch
    from serve.async_engine import AsyncLLM

    register_folder(registry, make_adapter(tiny_base, tmp_path / "a", name="faq"), "faq")
    shutil.rmtree(Path(registry.get(parse_ref("faq/1")).source.removeprefix("file://")))
    engine = AsyncLLM(LLM(**tiny_engine_args(tiny_base, registry.tracking_uri)).engine)
    try:
        with pytest.raises(NotFoundError, match="'faq/1' has no files in the registry's"):
            asyncio.run(AdapterWatch(engine).ensure("faq/1"))
    finally:
        engine.shutdown()


def test_loads_waiting_on_a_hung_registry_hold_up_no_folder_load(tiny_base, tmp_path, monkeypatch):
    """Registry calls run on threads of their own: however many first-use loads wait on a
    registry that does not answer (each up to its timeout), a folder loads meanwhile."""
    import os
    import threading

    from mlflow.exceptions import MlflowException

    from registry import tracking
    from serve.adapter_watch import AdapterWatch
    from serve.async_engine import AsyncLLM

    answer, waiting = threading.Event(), threading.Semaphore(0)

    def hung_probe(uri: str) -> None:
        waiting.release()
        answer.wait(60)
        raise MlflowException("no answer", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(tracking, "check_server_answers", hung_probe)
    folder = make_adapter(tiny_base, tmp_path / "folder", name="faq")
    llm = LLM(**tiny_engine_args(tiny_base, "http://registry.invalid:5000"))
    engine = AsyncLLM(llm.engine)
    watch = AdapterWatch(engine)
    refs = [f"n{i}/1" for i in range((os.cpu_count() or 1) + 5)]  # past asyncio's default pool

    async def main():
        hung = [asyncio.ensure_future(watch.ensure(ref)) for ref in refs]
        await asyncio.to_thread(waiting.acquire)  # one is in its probe
        try:
            loaded = await asyncio.wait_for(watch.load("local", str(folder)), 30)
        finally:
            answer.set()
            refused = await asyncio.gather(*hung, return_exceptions=True)
        return loaded, refused

    try:
        loaded, refused = asyncio.run(main())
    finally:
        engine.shutdown()
    assert loaded.name == "local"
    assert all(getattr(e, "code", None) == "registry_unavailable" for e in refused), refused


def test_a_reference_loaded_on_first_use_is_unloaded_once_no_request_names_it(
    tiny_base, registry, tmp_path
):
    """Each distinct reference a client asked for stayed loaded, listed, followed each poll
    and in the metrics for good. One an admin loaded stays."""
    from serve.adapter_watch import AdapterWatch
    from serve.async_engine import AsyncLLM

    folder = make_adapter(tiny_base, tmp_path / "a", name="faq")
    register_folder(registry, folder, "faq")
    engine = AsyncLLM(LLM(**tiny_engine_args(tiny_base, registry.tracking_uri)).engine)
    unloaded = []
    watch = AdapterWatch(engine, on_unload=unloaded.append)

    async def scenario():
        await watch.ensure("faq/1")
        await watch.load("kept", str(folder), "api")
        await asyncio.sleep(0.3)
        watch.asked("faq/1")  # a request named it
        assert await watch.unload_idle(0.2) == []
        await asyncio.sleep(0.3)
        assert await watch.unload_idle(0.2) == ["faq/1"]
        return sorted(watch.loaded)

    try:
        assert asyncio.run(scenario()) == ["kept"]
    finally:
        engine.shutdown()
    assert unloaded == ["faq/1"]


def test_the_server_unloads_an_idle_first_use_reference_and_its_metric_series(
    tiny_base, registry, tmp_path
):
    from serve.async_engine import AsyncLLM
    from serve.serve_config import ServeConfig
    from serve.server import create_app

    register_folder(registry, make_adapter(tiny_base, tmp_path / "a", name="faq"), "faq")
    engine = AsyncLLM(LLM(**tiny_engine_args(tiny_base, registry.tracking_uri)).engine)
    config = ServeConfig(
        alias_poll_interval_s=0.1, first_use_idle_s=1, audit={"path": tmp_path / "audit.jsonl"}
    )
    body = {"model": "faq/1", "prompt": PROMPT, "max_tokens": 2}

    def series() -> int:
        return httpx.get(url.removesuffix("/v1") + "/metrics").text.count('model="faq/1"')

    try:
        with running_server(create_app(engine, "tiny", config)) as url:
            for _ in range(4):  # asked every 0.5 s: kept though it is older than 1 s
                assert httpx.post(f"{url}/completions", json=body, timeout=30).is_success
                time.sleep(0.5)
            assert "faq/1" in engine.engine.adapters and series()
            deadline = time.monotonic() + 10
            while "faq/1" in engine.engine.adapters:
                assert time.monotonic() < deadline, "never unloaded"
                time.sleep(0.1)
            assert series() == 0
            assert httpx.post(f"{url}/completions", json=body, timeout=30).is_success  # again
    finally:
        engine.shutdown()


def test_a_running_server_keeps_the_downloads_it_serves_from_a_cache_prune(
    tiny_base, registry, tmp_path
):
    """Its host tier may evict a version and read it back from the download: as it follows
    its references, it marks their downloads used, and a prune spares them."""
    import os

    from registry.download_cache import prune
    from serve.adapter_watch import AdapterWatch
    from serve.async_engine import AsyncLLM

    register_folder(registry, make_adapter(tiny_base, tmp_path / "held", name="held"), "held")
    engine = AsyncLLM(LLM(**tiny_engine_args(tiny_base, registry.tracking_uri)).engine)
    watch = AdapterWatch(engine)

    async def main():
        info = await watch.ensure("held/1")
        days_ago = time.time() - 3 * 86400
        os.utime(info.path, (days_ago, days_ago))
        following = asyncio.ensure_future(watch.follow(0.05))
        await asyncio.sleep(0.5)
        following.cancel()
        return info

    try:
        info = asyncio.run(main())
    finally:
        engine.shutdown()
    prune(registry.home.adapters, 86400)
    assert (info.path / "adapter_model.safetensors").is_file()


def test_a_request_naming_a_folder_in_adapter_dir_loads_it_on_first_use(
    tiny_base, registry, tmp_path, monkeypatch
):
    """vLLM's filesystem resolver, LoRAX's local adapters: a team that keeps adapters in a
    folder serves each the first time a request names it, without a registry or a restart."""
    from serve.async_engine import AsyncLLM
    from serve.sampling_params import SamplingParams
    from serve.serve_config import ServeConfig
    from serve.server import create_app

    adapter_dir = tmp_path / "adapters"
    sql = make_lora(tiny_base, adapter_dir / "sql", rank=4, targets=["q_proj"], b_scale=1.0)
    (adapter_dir / "notes").mkdir()  # no adapter_config.json: not an adapter
    broken = adapter_dir / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "lora_alpha": 8}')
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    shutil.copytree(sql, adapter_dir / "3")  # read as a reference, `adapters/3` is version 3
    shutil.copytree(sql, adapter_dir / ("a" * 101))  # no adapter's name: too long
    # registered under the same name too: the folder is what the name means here
    register_folder(registry, make_adapter(tiny_base, tmp_path / "reg", name="sql"), "sql")
    engine = AsyncLLM(LLM(**tiny_engine_args(tiny_base, registry.tracking_uri)).engine)
    monkeypatch.chdir(tmp_path)
    config = ServeConfig(
        adapter_dir="adapters",  # as `--adapter-dir adapters` gives it: relative
        alias_poll_interval_s=0.1,
        first_use_idle_s=1,
        audit={"path": tmp_path / "audit.jsonl"},
    )
    reference = LLM(**tiny_engine_args(tiny_base))
    reference.load_adapter("sql", str(sql))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    [expected] = reference.generate([PROMPT], params, adapters=["sql"])
    try:
        with running_server(create_app(engine, "tiny", config)) as url:
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
            listed = {m.id: m.model_extra.get("loaded") for m in client.models.list()}
            assert {k: listed.get(k) for k in ("sql", "3", "broken", "notes", "a" * 101)} == {
                "sql": False,
                "3": False,
                "broken": False,
                "notes": None,
                "a" * 101: None,
            }
            reply = client.completions.create(
                model="sql", prompt=PROMPT, **ANSWER | {"max_tokens": 6}
            )
            assert reply.choices[0].text == expected.text
            info = engine.engine.adapters["sql"]
            assert (info.path, info.version) == (sql.resolve(), None)
            again = client.completions.create(
                model="3", prompt=PROMPT, **ANSWER | {"max_tokens": 6}
            )
            assert again.choices[0].text == expected.text
            for name in ("notes", "nothing", "../adapters/sql", ".sql"):
                with pytest.raises(openai.NotFoundError, match="adapter folder in adapter_dir"):
                    client.completions.create(model=name, prompt=PROMPT, max_tokens=1)
            with pytest.raises(openai.BadRequestError) as refused:
                client.completions.create(model="broken", prompt=PROMPT, max_tokens=1)
            assert refused.value.body["param"] == "model"
            assert "adapter_dir/broken/adapter_model" in refused.value.body["message"]
            assert str(tmp_path) not in refused.value.body["message"]  # the server's own paths
            deadline = time.monotonic() + 10
            while "sql" in engine.engine.adapters:  # unloaded once idle, as a reference is
                assert time.monotonic() < deadline, "never unloaded"
                time.sleep(0.1)
    finally:
        engine.shutdown()


def _fake_watch(tmp_path, adapters: dict):
    """An AdapterWatch over a stand-in engine that holds `adapters` by name."""
    from types import SimpleNamespace

    from serve.adapter_watch import AdapterWatch

    config = SimpleNamespace(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    inner = SimpleNamespace(config=config, home=None, adapters=adapters)
    return AdapterWatch(SimpleNamespace(engine=inner))


def test_marking_downloads_used_survives_a_load_on_the_engine_thread_meanwhile(
    tmp_path, monkeypatch
):
    """The engine thread loads and unloads while the loop marks downloads (mark_used waits on
    the disk, letting it run): iterating its dict raised, and ended the alias following."""
    from types import SimpleNamespace

    from serve import adapter_watch

    adapters = {f"a{i}": SimpleNamespace(version=1, path=tmp_path / f"a{i}") for i in range(3)}
    marked = []

    def mark_used(path):  # meanwhile, on the engine thread, another adapter loads
        marked.append(path)
        adapters[f"new{len(marked)}"] = SimpleNamespace(version=None, path=None)

    monkeypatch.setattr(adapter_watch, "mark_used", mark_used)
    _fake_watch(tmp_path, adapters).hold_downloads()
    assert marked == [tmp_path / f"a{i}" for i in range(3)]


def test_a_poll_that_fails_leaves_the_next_polls_following(tmp_path):
    watch = _fake_watch(tmp_path, {})
    polls = []

    async def follow_moves():
        polls.append(time.monotonic())
        if len(polls) == 1:
            raise RuntimeError("a bug in one poll")

    watch.follow_moves = follow_moves

    async def main():
        following = asyncio.ensure_future(watch.follow(0.01))
        while len(polls) < 3:
            await asyncio.sleep(0.01)
            assert not following.done(), following.exception()
        following.cancel()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert len(polls) >= 3
