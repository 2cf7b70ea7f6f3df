"""Typed YAML config files shared by every command: read, `key=value` overrides, validate.

Errors name the file and the dotted key, so `loraplex train|serve|gate CONFIG` all explain a
bad config the same way (exit code 2).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError

from registry.errors import ConfigError
from registry.home import expand_user
from registry.refs import check_adapter_name, check_name

Config = TypeVar("Config", bound=BaseModel)


def _not_a_bool(value):
    if isinstance(value, bool):  # YAML's `yes`, `on`, `true`: pydantic would read 1.0
        raise ValueError("a number, not a boolean")
    return value


# A config's float: lax about strings (YAML 1.1 reads `1e-4` as one), never a boolean.
Number = Annotated[float, BeforeValidator(_not_a_bool)]

# An adapter's registered name (a train or gate config's), and the name one is served under.
Name = Annotated[str, AfterValidator(check_name)]
AdapterName = Annotated[str, AfterValidator(check_adapter_name)]


class StrictConfig(BaseModel):
    """A config section: an unknown key is an error (a typo, not a silent default), and no
    float is `.inf` or `.nan` (or `1e400`): `.inf` passes `gt=0` (`lora.alpha: .inf` trains
    NaNs, `kv_cache_memory_gb: .inf` overflows), and a NaN bound compares false with every
    value, so it would never fail. Ints and bools are declared StrictInt / StrictBool, so
    `max_steps: 1.0` or `true` is refused, not read as 1."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the
    last silently, dropping the first: a whole `engine:` section, say), and the numbers YAML
    1.1 reads in another base: a leading zero is octal (`max_steps: 010` would be 8), and
    colons are base 60 (`max_steps: 1:30` would be 90)."""

    def construct_yaml_int(self, node):
        _refuse_other_bases(self.construct_scalar(node), node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node):
        _refuse_other_bases(self.construct_scalar(node), node)
        return super().construct_yaml_float(node)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: keys after it may override what it brings
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (again on line {line})"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _refuse_other_bases(text: str, node) -> None:
    if re.fullmatch(r"[-+]?0[0-7_]+", text):
        problem = "a leading 0 reads as octal; write it without"
    elif ":" in text:
        problem = "YAML reads a number with colons in base 60; quote it or write it plainly"
    else:
        return
    raise yaml.constructor.ConstructorError(None, None, f"{text!r}: {problem}", node.start_mark)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _UniqueKeyLoader.construct_yaml_float)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects


def read_config(path: Path, model: type[Config], overrides: list[str] = ()) -> Config:
    """The YAML file at `path` with `overrides` applied, validated as `model`."""
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a config file" if path.is_dir() else "config file not found"
        raise ConfigError(f"{path}: {what}")
    try:
        raw = _load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        where = str(e).replace('in "<unicode string>", ', "")  # the path is named already
        raise ConfigError(f"{path}: not valid YAML: {where}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values")
    # Top-level `x-` keys hold what anchors share (`x-defaults: &defaults {...}`), as in
    # Compose files: no config has such a key, so none is a typo to refuse.
    raw = {k: v for k, v in raw.items() if not (isinstance(k, str) and k.startswith("x-"))}
    for override in overrides:
        _apply_override(raw, override, path)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: invalid config\n" + format_errors(e)) from None


def relative_to_file(config_path: Path, value: Path) -> Path:
    """A path written in a config file, read relative to that file unless absolute."""
    value = expand_user(value, str(config_path))
    return value if value.is_absolute() else (Path(config_path).parent / value).resolve()


def format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"] if not is_union_member(part))
        # A validator's own message needs no "Value error, " before it.
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        message = message.removeprefix("Value error, ")
        # A whole section as the value would bury the message; a scalar helps.
        quiet = item["type"] in {"extra_forbidden", "missing"} or isinstance(
            item["input"], dict | list
        )
        got = "" if quiet else f" (got {item['input']!r})"
        lines.append(f"  {key}: {message}{got}")
    return "\n".join(dict.fromkeys(lines))


def is_union_member(part) -> bool:
    """A union member pydantic puts into an error's location ("str", "list[int]"): not a key."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _apply_override(raw: dict, override: str, path: Path) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. training.max_steps=10")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{path}: override {key}: {part} is not a section")
        node = child
    try:
        if value.startswith(("./", "../", "~")):  # a path typed in the shell: from where it was
            node[parts[-1]] = str(Path(value).expanduser().resolve())
            return
        node[parts[-1]] = _load_yaml(value) if value else ""
    except (yaml.YAMLError, RuntimeError) as e:  # RuntimeError: `~user` of no such user
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {key}: {value!r} is not a valid value: {reason}") from None
