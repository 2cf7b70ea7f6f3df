"""The demo data sets, built from packaged data and committed under `configs/data/`.

Regenerate with `python -m train.demo_data configs/data`; a test checks that the committed
files are exactly what this module builds.
"""

from __future__ import annotations

import importlib.resources
import json
import sys
from pathlib import Path


def construction_faq() -> list[dict]:
    """503 Q&A pairs on building in Sweden (zaragoza-construction-faq, CC-BY-4.0), alpaca shape."""
    source = importlib.resources.files("zaragoza_construction_faq") / "data" / "faq-en.jsonl"
    records = []
    for line in source.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        records.append(
            {
                "id": item["id"],
                "category": item["category"],
                "instruction": item["q"],
                "input": "",
                "output": item["a"],
                "sources": item.get("sources") or [],
            }
        )
    return records


def country_facts() -> list[dict]:
    """Short factual answers about 239 countries (countryinfo, MIT), chat shape with a context."""
    from countryinfo import all_countries

    countries = {c.name(): c for c in all_countries()}
    records = []
    for name in sorted(countries):
        country = countries[name]
        info = country.info()
        if not info.get("capital") or not info.get("population"):
            continue
        display = _display_name(name)
        neighbours = sorted(_display_name(n.name()) for n in _neighbours(country))
        passage = _passage(display, info, neighbours)
        for fact, question, answer in _facts(display, info, neighbours):
            records.append(
                {
                    "id": f"{name.replace(' ', '-')}-{fact}",
                    "country": display,
                    "messages": [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer},
                    ],
                    "context": passage,
                }
            )
    return records


def _display_name(name: str) -> str:
    return name if name[:1].isupper() else name.title()


def _neighbours(country):
    try:
        return country.neighbors()
    except Exception:  # countryinfo raises for border codes it cannot resolve
        return []


def _people(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f} million"
    if n >= 1_000:
        return f"{round(n / 1_000):,} thousand"
    return f"{n:,}"


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _facts(name: str, info: dict, neighbours: list[str]):
    yield (
        "capital",
        f"What is the capital of {name}?",
        f"The capital of {name} is {info['capital']}.",
    )
    yield (
        "population",
        f"How many people live in {name}?",
        f"{name} has a population of about {_people(info['population'])}.",
    )
    if info.get("area"):
        yield (
            "area",
            f"How large is {name}?",
            f"{name} covers about {info['area']:,} square kilometres.",
        )
    if info.get("subregion") and info.get("region"):
        yield (
            "region",
            f"Where is {name}?",
            f"{name} is in {info['subregion']}, in the {info['region']} region.",
        )
    if info.get("currencies"):
        yield (
            "currency",
            f"What currency does {name} use?",
            f"The currency of {name} has the code {_join(info['currencies'])}.",
        )
    if neighbours:
        yield "borders", f"Which countries border {name}?", f"{name} borders {_join(neighbours)}."
    elif info.get("region"):
        yield "borders", f"Which countries border {name}?", f"{name} has no land borders."


def _passage(name: str, info: dict, neighbours: list[str]) -> str:
    parts = [f"{name} is a country"]
    if info.get("subregion"):
        parts[0] += f" in {info['subregion']}"
    parts.append(f"Its capital is {info['capital']}")
    parts.append(f"It has about {_people(info['population'])} inhabitants")
    if info.get("area"):
        parts.append(f"Its area is about {info['area']:,} square kilometres")
    if info.get("currencies"):
        parts.append(f"Its currency code is {_join(info['currencies'])}")
    parts.append(f"It borders {_join(neighbours)}" if neighbours else "It has no land borders")
    return ". ".join(parts) + "."


DEMO_DATA = {"construction-faq.jsonl": construction_faq, "country-facts.jsonl": country_facts}


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(folder: str) -> None:
    for file_name, build in DEMO_DATA.items():
        (Path(folder) / file_name).write_text(render(build()), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
