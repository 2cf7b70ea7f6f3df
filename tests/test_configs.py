"""Every shipped YAML validates; bad configs are refused with the file and key named, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from eval.gate_config import load_gate_config
from registry.errors import ConfigError
from serve.serve_config import load_serve_config, serve_settings
from tests.helpers import PROJECT, run_cli
from train.config import load_config

LOADERS = {"train": load_config, "serve": load_serve_config, "gates": load_gate_config}


@pytest.mark.parametrize(
    "path", sorted(PROJECT.glob("configs/*/*.yaml")), ids=lambda p: str(p.relative_to(PROJECT))
)
def test_every_shipped_config_validates(path):
    loader = LOADERS.get(path.parent.name)
    assert loader is not None, f"no loader for configs/{path.parent.name}/"
    config = loader(path)
    if path.parent.name == "train":
        assert config.data.path.is_file()
    if path.parent.name == "gates":  # one gate per adapter, named after it
        assert config.adapter == path.stem


GOOD = {
    "name": "demo",
    "data": {"path": str(PROJECT / "configs/data/country-facts.jsonl")},
}


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _with(section: str, key: str, value) -> dict:
    config = {**GOOD, section: {**GOOD.get(section, {}), key: value}}
    return config


@pytest.mark.parametrize(
    ("config", "key", "message"),
    [
        ({**GOOD, "epochs": 3}, "epochs", "unknown key"),
        (_with("lora", "rank", 8), "lora.rank", "unknown key"),
        (_with("training", "max_steps", "ten"), "training.max_steps", "valid integer"),
        (_with("training", "max_steps", 0), "training.max_steps", "greater than or equal to 1"),
        (_with("lora", "r", 4096), "lora.r", "less than or equal to 1024"),
        (_with("lora", "dropout", 1.5), "lora.dropout", "less than 1"),
        (_with("lora", "target_modules", ["qkv"]), "lora.target_modules", "choose 'all-linear'"),
        (_with("quantization", "method", "int3"), "quantization.method", "'nf4', 'fp4' or 'none'"),
        (_with("training", "optimizer", "sgd"), "training.optimizer", "'paged_adamw_8bit'"),
        ({"data": GOOD["data"]}, "name", "Field required"),
        ({**GOOD, "name": "has space"}, "name", "letters, digits"),
        ({**GOOD, "data": {"path": "x.txt"}}, "data.path", ".parquet file (got 'x.txt')"),
        (
            {**GOOD, "data": {**GOOD["data"], "split": {"test": 2.5}}},
            "data.split.test",
            "whole number",
        ),
        (
            {**GOOD, "data": {**GOOD["data"], "split": {"seed": -1}}},
            "data.split.seed",
            "greater than or equal to 0",
        ),
        (_with("training", "seed", -1), "training.seed", "greater than or equal to 0"),
        (_with("training", "seed", 2**32), "training.seed", "less than or equal to 4294967295"),
        (_with("training", "max_steps", 1.0), "training.max_steps", "valid integer (got 1.0)"),
        (_with("training", "max_steps", True), "training.max_steps", "valid integer (got True)"),
        (_with("data", "packing", 1), "data.packing", "valid boolean (got 1)"),
        (_with("lora", "use_rslora", "yes"), "lora.use_rslora", "valid boolean (got 'yes')"),
        (_with("lora", "alpha", True), "lora.alpha", "a number, not a boolean (got True)"),
        (_with("training", "learning_rate", True), "training.learning_rate", "not a boolean"),
        (
            {**GOOD, "data": {**GOOD["data"], "split": {"test": True}}},
            "data.split.test",
            "a number, not a boolean",
        ),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, config, key, message):
    path = _write(tmp_path, config)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    text = str(error.value)
    assert str(path) in text
    assert f"{key}: " in text
    assert message in text


def test_missing_data_file_is_named(tmp_path):
    path = _write(tmp_path, {**GOOD, "data": {"path": "nowhere.jsonl"}})
    with pytest.raises(ConfigError, match=r"data\.path: file not found: .*nowhere\.jsonl"):
        load_config(path)


def test_missing_config_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="a folder, not a config file"):
        load_config(tmp_path)
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as error:
        load_config(path)
    assert "line 2" in str(error.value) and "unicode string" not in str(error.value)
    path.write_bytes(b"name: caf\xe9\n")  # Latin-1
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 9\)"):
        load_config(path)


def test_an_integer_with_a_leading_zero_is_refused_not_read_as_octal(tmp_path):
    path = _write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=r"training\.max_steps: '010' is not a valid value: "):
        load_config(path, ["training.max_steps=010"])  # YAML 1.1: 8
    path.write_text(path.read_text() + "\nextra: 010\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: '010': a leading 0 reads as octal"):
        load_config(path)
    assert load_config(_write(tmp_path, GOOD), ["training.max_steps=10"]).training.max_steps == 10


def test_a_number_with_colons_is_refused_not_read_in_base_60(tmp_path):
    path = _write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=r"training\.max_steps: '1:30' is not a valid value"):
        load_config(path, ["training.max_steps=1:30"])  # YAML 1.1: 90
    for line in ("training: {max_steps: 1:30}", "lora: {dropout: 1:30.5}"):
        path.write_text(path.read_text().split("training")[0] + line + "\n")
        with pytest.raises(ConfigError, match=r"not valid YAML: '1:30(\.5)?': YAML reads a n"):
            load_config(path)


def test_a_key_given_twice_is_refused_not_the_first_dropped(tmp_path):
    path = _write(tmp_path, GOOD)
    path.write_text(path.read_text() + "name: other\n")  # plain YAML keeps this one alone
    with pytest.raises(ConfigError, match="key 'name' appears twice"):
        load_config(path)


def test_yaml_merge_keys_load_and_keys_after_them_override_what_they_bring(tmp_path):
    """`<<: *team` shares settings between api_keys; a key given twice is still refused."""
    path = tmp_path / "serve.yaml"
    team = "api_keys:\n  - &team {id: a, env: KEY_A, adapters: [x], admin: true}\n"
    path.write_text(team + "  - {<<: *team, id: b, env: KEY_B}\n")
    keys = load_serve_config(path).api_keys
    assert [(k.id, k.env, k.adapters, k.admin) for k in keys] == [
        ("a", "KEY_A", ["x"], True),
        ("b", "KEY_B", ["x"], True),
    ]
    path.write_text(team + "  - {<<: *team, id: b, env: KEY_B, id: c}\n")
    with pytest.raises(ConfigError, match="key 'id' appears twice"):
        load_serve_config(path)
    # Shared values under a top-level x- key, as in Compose files: it was an unknown key.
    shared = "x-limits: &limits {max_num_seqs: 4, max_loras: 2}\n"
    path.write_text(shared + "engine: {<<: *limits, max_loras: 3}\n")
    engine = load_serve_config(path).engine
    assert (engine.max_num_seqs, engine.max_loras) == (4, 3)
    path.write_text(shared.replace("x-limits", "limits"))
    with pytest.raises(ConfigError, match="limits: unknown key"):
        load_serve_config(path)


def test_overrides_are_typed_and_nested(tmp_path):
    path = _write(tmp_path, GOOD)
    config = load_config(
        path,
        [
            "training.max_steps=7",
            "lora.target_modules=[q_proj, v_proj]",
            "data.split.validation=16",
            "data.packing=true",
        ],
    )
    assert config.training.max_steps == 7
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.split.validation == 16
    assert config.data.packing is True
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["training.max_steps"])
    for value, reason in (("[1", "expected ',' or ']'"), ("@x", "'@' that cannot start")):
        with pytest.raises(ConfigError, match=f"override training.max_steps: .*{reason}"):
            load_config(path, [f"training.max_steps={value}"])
    with pytest.raises(ConfigError, match=r"override experiment: .* home directory"):
        load_config(path, ["experiment=~no-such-user-here/x"])
    with pytest.raises(ConfigError, match=r"training\.warmup: unknown key"):
        load_config(path, ["training.warmup=3"])


def test_relative_data_path_is_resolved_from_the_config_file():
    config = load_config(PROJECT / "configs/train/country-facts_smollm2-135m_qlora_cpu.yaml")
    assert config.data.path == PROJECT / "configs/data/country-facts.jsonl"


def test_a_path_in_an_override_is_read_from_the_working_directory(tmp_path, monkeypatch):
    config = PROJECT / "configs/train/country-facts_smollm2-135m_qlora_cpu.yaml"
    mine = tmp_path / "mine.jsonl"
    mine.write_text((PROJECT / "configs/data/country-facts.jsonl").read_text())
    monkeypatch.chdir(tmp_path)
    assert load_config(config, ["data.path=./mine.jsonl"]).data.path == mine
    with pytest.raises(ConfigError, match="file not found"):  # a bare name: the YAML's folder
        load_config(config, ["data.path=mine.jsonl"])


def test_serve_on_a_busy_port_is_refused_before_the_model_loads(tmp_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run_cli("serve", "--port", str(port), env={"LORAPLEX_HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert f"port {port}: cannot listen on 127.0.0.1:{port}: Address" in result.stderr
    assert "serving" not in result.stdout and not (tmp_path / "models").exists()


def test_the_port_check_binds_an_ipv6_host_as_uvicorn_will():
    """`--host ::1` was checked as an IPv4 address and refused ("Address family for hostname
    not supported"), though uvicorn serves it."""
    import socket

    from registry.errors import UsageError
    from serve.cli import _check_port_free

    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6) as probe:
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    _check_port_free("::1", port)
    busy = pytest.raises(UsageError, match=rf"cannot listen on ::1:{port}: Address already")
    with socket.create_server(("::1", port), family=socket.AF_INET6), busy:
        _check_port_free("::1", port)


def test_serve_names_the_registry_its_yaml_or_override_set_in_errors(tmp_path):
    """Only --tracking-uri was named: an unreachable registry set in the YAML was reported as
    the embedded store."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}"
    (tmp_path / "serve.yaml").write_text(f"tracking_uri: {nowhere}\nadapters: {{faq: faq/1}}\n")
    env = {"LORAPLEX_HOME": str(tmp_path)}
    result = run_cli("serve", str(tmp_path / "serve.yaml"), env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: MLflow at {nowhere}: "), result.stderr


@pytest.mark.parametrize("unwritable", ["audit", "key"])
def test_serve_refuses_an_unwritable_audit_log_or_unset_key_before_the_model_loads(
    tmp_path, unwritable
):
    (tmp_path / "a-file").write_text("")
    config = tmp_path / "serve.yaml"
    if unwritable == "audit":
        config.write_text("audit: {path: a-file/audit.jsonl}\n")
        message = f"audit.path: cannot append to {tmp_path / 'a-file/audit.jsonl'}"
    else:
        config.write_text("api_keys: [{id: ops, env: LORAPLEX_TEST_UNSET_KEY}]\n")
        message = "environment variable LORAPLEX_TEST_UNSET_KEY is not set"
    result = run_cli("serve", str(config), env={"LORAPLEX_HOME": str(tmp_path / "home")})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "home" / "models").exists()  # no model was loaded


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["serve", "--adapter", "faq=nobody@champion"], "no registered adapter named 'nobody'"),
        (["serve", "--adapter", "faq=./no-such-folder"], "'./no-such-folder': no such folder"),
        (["serve", "--adapter-dir", "./nowhere"], "adapter_dir: 'nowhere' is not a folder"),
        (["generate", "hi", "--adapter", "nobody/3"], "no registered adapter named 'nobody'"),
        (["generate", "hi", "--top-p", "0"], "top_p must be in (0, 1] (got 0.0)"),
    ],
)
def test_a_bad_adapter_or_setting_is_refused_before_the_model_loads(tmp_path, command, message):
    result = run_cli(*command, env={"LORAPLEX_HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models").exists()  # the base was never converted


def test_cli_refuses_bad_config_with_exit_2_and_no_traceback(tmp_path):
    path = _write(tmp_path, _with("training", "learning_rate", -1))
    result = run_cli("train", str(path))
    assert result.returncode == 2
    assert "training.learning_rate: Input should be greater than 0" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    result = run_cli("train", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert "config file not found" in result.stderr


SERVE_YAML = PROJECT / "configs/serve/smollm2-135m_nf4_cpu.yaml"


@pytest.mark.parametrize(
    ("config", "key", "message"),
    [
        ({"port": 0}, "port", "greater than or equal to 1"),
        ({"max_waiting": 0}, "max_waiting", "greater than or equal to 1"),
        ({"engine": {"max_loras": 0}}, "engine.max_loras", "greater than or equal to 1"),
        (
            {"engine": {"max_loras": 8, "max_cpu_loras": 4}},
            "engine.max_cpu_loras",
            "must be at least max_loras (8)",
        ),
        ({"engine": {"base_model": "x"}}, "engine", "at the top level"),
        ({"adapters": {"has space": "faq"}}, "adapters.has space", "letters, digits"),
        ({"api_keys": [{"id": "a", "sha256": "abc"}]}, "api_keys.0.sha256", "64 hex digits"),
        ({"api_keys": [{"id": "a"}]}, "api_keys.0", "exactly one of sha256 or env"),
        ({"api_keys": [{"id": "a", "env": "A"}, {"id": "a", "env": "B"}]}, "api_keys", "unique"),
        ({"audit": {"prompts": True}}, "audit.prompts", "unknown key"),
        # YAML's `true` is no port 1, nor `0` a switch off (as in the training config)
        ({"port": True}, "port", "valid integer"),
        ({"engine": {"block_size": True}}, "engine.block_size", "valid integer"),
        ({"engine": {"enable_prefix_caching": 0}}, "engine.enable_prefix_caching", "valid boolean"),
        # `.inf` passes gt=0: an endless timeout, a KV pool whose byte count overflows
        ({"request_timeout_s": float("inf")}, "request_timeout_s", "finite number"),
        ({"engine": {"kv_cache_memory_gb": float("inf")}}, "engine.kv_cache_memory_gb", "finite"),
    ],
)
def test_bad_serve_config_names_file_and_key(tmp_path, config, key, message):
    path = _write(tmp_path, config)
    with pytest.raises(ConfigError) as error:
        load_serve_config(path)
    text = str(error.value)
    assert str(path) in text and f"{key}: " in text and message in text


def test_serve_flags_override_the_yaml_and_paths_are_read_from_the_file(tmp_path):
    path = _write(
        tmp_path,
        {
            "port": 9000,
            "adapters": {"faq": "./faq", "sub": "runs/sub", "v3": "faq/3", "up": "/srv/up"},
            "audit": {"path": "logs/audit.jsonl"},
            "adapter_dir": "adapters",
        },
    )
    settings = serve_settings(path, adapters=["facts=country-facts@champion"], port=9100, host=None)
    assert settings.port == 9100 and settings.host == "127.0.0.1"
    assert settings.adapters == {
        "faq": str(tmp_path / "faq"),
        "sub": str(tmp_path / "runs/sub"),  # a folder without ./ (not a reference): the file's
        "v3": "faq/3",  # a registry reference
        "up": "/srv/up",
        "facts": "country-facts@champion",  # from the command line
    }
    assert settings.audit.path == tmp_path / "logs/audit.jsonl"
    assert settings.adapter_dir == tmp_path / "adapters"
    assert serve_settings(path, adapter_dir=Path("mine")).adapter_dir == Path("mine")  # the cwd's
    shipped = serve_settings(SERVE_YAML, base_model="/models/other")
    assert shipped.engine_config().base_model == "/models/other"
    assert shipped.engine_config().max_num_seqs == load_serve_config(SERVE_YAML).engine.max_num_seqs
    with pytest.raises(ConfigError, match="expected NAME=REF"):
        serve_settings(None, adapters=["faq"])


def test_serve_overrides_apply_over_the_yaml_and_under_the_flags(tmp_path):
    path = _write(tmp_path, {"port": 9000, "engine": {"max_num_seqs": 4}})
    overrides = ["engine.max_num_seqs=7", "port=9200", "audit.path=./audit.jsonl"]
    settings = serve_settings(path, overrides, host="0.0.0.0")
    assert (settings.engine.max_num_seqs, settings.port, settings.host) == (7, 9200, "0.0.0.0")
    assert settings.audit.path == Path.cwd() / "audit.jsonl"  # typed in the shell: from here
    assert serve_settings(path, ["port=9200"], port=9300).port == 9300
    with pytest.raises(ConfigError, match=r"engine\.max_num_seqs: Input should be greater"):
        serve_settings(path, ["engine.max_num_seqs=0"])
    with pytest.raises(ConfigError, match="overrides come after a serve YAML"):
        serve_settings(Path("engine.max_num_seqs=7"))


def test_serve_cli_refuses_a_bad_config_with_exit_2(tmp_path):
    result = run_cli("serve", str(_write(tmp_path, {"request_timeout_s": 0})))
    assert result.returncode == 2
    assert "request_timeout_s: Input should be greater than 0" in result.stderr
    result = run_cli("serve", str(_write(tmp_path, {})), "shutdown_timeout_s=.inf")  # an override
    assert result.returncode == 2
    assert "shutdown_timeout_s: Input should be a finite number" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("q_proj", ["q_proj"]),
        ("all-linear", "all-linear"),
        ("[q_proj, v_proj]", ["q_proj", "v_proj"]),
    ],
)
def test_a_bare_target_module_is_a_one_element_list_for_peft(tmp_path, value, expected):
    config = load_config(_write(tmp_path, GOOD), [f"lora.target_modules={value}"])
    assert config.lora.target_modules == expected


def test_strict_ints_and_bools_leave_floats_and_paths_as_yaml_writes_them(tmp_path):
    path = _write(tmp_path, GOOD)  # data.path is a string in the YAML
    config = load_config(path, ["training.learning_rate=1e-4", "lora.alpha=8", "data.packing=yes"])
    assert config.training.learning_rate == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert config.lora.alpha == 8.0 and isinstance(config.lora.alpha, float)
    assert config.data.packing is True  # `yes` is YAML's own boolean


def test_training_takes_max_steps_or_epochs_not_both(tmp_path):
    path = _write(tmp_path, GOOD)
    # neither given: 100 steps, recorded as before epochs existed (older runs still resume)
    default = load_config(path).training
    assert (default.max_steps, default.epochs) == (100, None)
    with pytest.raises(ConfigError, match=r"training: give training\.max_steps or training\.ep"):
        load_config(path, ["training.max_steps=10", "training.epochs=2"])
    both_unset = load_config(path, ["training.max_steps=null", "training.epochs=1.5"]).training
    assert (both_unset.max_steps, both_unset.epochs) == (None, 1.5)
    with pytest.raises(ConfigError, match=r"training\.epochs: Input should be greater than 0"):
        load_config(path, ["training.max_steps=null", "training.epochs=0"])
    with pytest.raises(
        ConfigError, match=r"training: give training\.max_steps or training\.epochs$"
    ):
        load_config(path, ["training.max_steps=null"])
