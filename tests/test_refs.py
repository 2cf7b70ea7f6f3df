"""Registry references: `name`, `name/3`, `name@alias`."""

import pytest

from registry.errors import UsageError
from registry.refs import AdapterRef, check_alias, is_ref, parse_ref


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("construction-faq", AdapterRef("construction-faq")),
        ("construction-faq/3", AdapterRef("construction-faq", version=3)),
        ("construction-faq@champion", AdapterRef("construction-faq", alias="champion")),
        ("a.b_c-1/12", AdapterRef("a.b_c-1", version=12)),
        ("faq@2024-q3", AdapterRef("faq", alias="2024-q3")),  # any alias MLflow takes
        ("faq@_rc", AdapterRef("faq", alias="_rc")),
    ],
)
def test_refs_parse_and_print_back(text, expected):
    assert parse_ref(text) == expected
    assert str(parse_ref(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "name/0",
        "name/x",
        "name@",
        "name@bad!",
        "name@" + "a" * 256,
        "na me",
        "/abs/path",
        "name/3@champion",
        "name/" + "9" * 19,  # past MLflow's int64
        "name/" + "9" * 5000,  # past what Python's int() reads
        "faq\n",  # `$` matched before a last newline: a second name for faq
        "faq/3\n",
        "faq@champion\n",
        "a" * 101,
    ],
)
def test_malformed_refs_are_refused_naming_the_forms(text):
    with pytest.raises(UsageError, match="is not NAME, NAME/VERSION or NAME@ALIAS") as error:
        parse_ref(text)
    assert "at most 100" in str(error.value)  # a name too long is told why
    assert not is_ref(text)


@pytest.mark.parametrize("alias", ["latest", "LATEST", "v1", "V2", "v10"])
def test_aliases_mlflow_reserves_are_refused(alias):
    with pytest.raises(UsageError, match=f"alias '{alias}' is reserved by MLflow"):
        parse_ref(f"name@{alias}")


@pytest.mark.parametrize(
    "alias",
    ["v\u0661", "caf\u00e9", "a" * 244],  # an Arabic-Indic digit; é; past the former_ tag's room
    ids=["non-ascii-digit", "accented", "244-characters"],
)
def test_aliases_mlflow_would_refuse_or_cannot_move_are_refused_up_front(alias):
    """MLflow reserves `v` and any Unicode digits, and a moved alias leaves a `former_<alias>`
    tag whose key holds at most 250 characters: the alias had moved when that failed."""
    with pytest.raises(UsageError, match="must be letters, digits, '_' or '-' \\(1 to 243"):
        check_alias(alias)
    assert not is_ref(f"name@{alias}")
    assert parse_ref(f"name@{'a' * 243}").alias == "a" * 243


def test_aliases_that_only_look_reserved_are_kept():
    assert parse_ref("name@v1beta").alias == "v1beta"
    assert parse_ref("name@latest-good").alias == "latest-good"
