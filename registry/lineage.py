"""Lineage of an adapter: what it was trained from, stored as `loraplex.json` beside its weights.

The same facts become tags on its registry version; the file keeps them with the folder so a
folder copied anywhere can still be checked against the base it is loaded onto.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from registry.base_model import tokenizer_differences
from registry.errors import AdapterError, BaseMismatchError

LINEAGE_FILE = "loraplex.json"
TOKENIZER_TAG = "tokenizer."  # the prefix of a version's tags holding its tokenizer's digests


@dataclass(frozen=True)
class Lineage:
    name: str
    base_model: str
    base_fingerprint: str
    data_hash: str
    rank: int
    alpha: float
    target_modules: list[str]
    loraplex_version: str
    metrics: dict[str, float] = field(default_factory=dict)
    # the base tokenizer's digests by part (base_model.tokenizer_digests); empty in lineages
    # written before they were recorded, which are not checked against them
    tokenizer: dict[str, str] = field(default_factory=dict)

    def tags(self) -> dict[str, str]:
        """Registry tags: the searchable subset of the lineage."""
        tags = {
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "data_hash": self.data_hash,
            "rank": str(self.rank),
            "target_modules": ",".join(self.target_modules),
            "loraplex_version": self.loraplex_version,
        }
        # each part a tag of its own: compared by part, as a newer release may add parts
        tags |= {f"{TOKENIZER_TAG}{part}": digest for part, digest in self.tokenizer.items()}
        return tags

    def write(self, adapter_dir: Path) -> None:
        (adapter_dir / LINEAGE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, adapter_dir: Path) -> Lineage | None:
        """The lineage of a folder, or None for a PEFT adapter trained elsewhere."""
        file = adapter_dir / LINEAGE_FILE
        if not file.is_file():
            return None
        try:
            fields = json.loads(file.read_text())
            known = {f.name for f in dataclasses.fields(cls)}  # a newer loraplex may add keys
            lineage = cls(**{k: v for k, v in fields.items() if k in known})
            if not isinstance(lineage.tokenizer, dict):  # checked by part at every load
                raise TypeError(f"tokenizer is a {type(lineage.tokenizer).__name__}, not an object")
            return lineage
        except (ValueError, TypeError, AttributeError) as error:  # ValueError: JSON, UTF-8
            raise AdapterError(f"{file} is not a loraplex lineage file ({error})") from None


def tokenizer_from_tags(tags: dict[str, str]) -> dict[str, str]:
    """A version's tokenizer digests by part, from its tags (empty if it recorded none)."""
    return {
        k.removeprefix(TOKENIZER_TAG): v for k, v in tags.items() if k.startswith(TOKENIZER_TAG)
    }


def adapter_config(config_file: Path, raw: bytes | None = None) -> dict:
    """A PEFT folder's adapter_config.json (`raw`: its bytes, if read already), or an
    AdapterError naming the file if it is not a JSON object."""
    try:
        config = json.loads(config_file.read_bytes() if raw is None else raw)
    except ValueError as error:
        raise AdapterError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file} is not a JSON object")
    return config


def check_adapter_folder(
    adapter_dir: Path,
    base_fingerprint: str | None = None,
    tokenizer: dict[str, str] | None = None,
) -> Lineage | None:
    """Refuse a folder that is not a PEFT LoRA adapter, or was trained on another base than
    `base_fingerprint`, or with another tokenizer than `tokenizer` (its digests by part)."""
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    peft_type = adapter_config(config_file).get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{adapter_dir} is a {peft_type} adapter; only LoRA adapters are served")
    lineage = Lineage.read(adapter_dir)
    if base_fingerprint and lineage and lineage.base_fingerprint != base_fingerprint:
        raise BaseMismatchError(
            f"adapter {lineage.name!r} was trained on base {lineage.base_model!r} "
            f"({lineage.base_fingerprint}), not on this base ({base_fingerprint})"
        )
    if tokenizer and lineage:
        differ = tokenizer_differences(lineage.tokenizer, tokenizer)
        if differ:
            raise BaseMismatchError(
                f"adapter {lineage.name!r} was trained with another {' and '.join(differ)} "
                f"than this base's tokenizer has (base {lineage.base_model!r}): served with "
                "these, it would read and write text it was not trained on"
            )
    return lineage
