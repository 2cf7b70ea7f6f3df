"""Registry references: `name`, `name/3`, `name@alias`."""

import pytest

from registry.errors import UsageError
from registry.refs import AdapterRef, parse_ref


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("construction-faq", AdapterRef("construction-faq")),
        ("construction-faq/3", AdapterRef("construction-faq", version=3)),
        ("construction-faq@champion", AdapterRef("construction-faq", alias="champion")),
        ("a.b_c-1/12", AdapterRef("a.b_c-1", version=12)),
    ],
)
def test_refs_parse_and_print_back(text, expected):
    assert parse_ref(text) == expected
    assert str(parse_ref(text)) == text


@pytest.mark.parametrize(
    "text", ["", "name/0", "name/x", "name@", "name@1st", "na me", "/abs/path", "name/3@champion"]
)
def test_malformed_refs_are_refused_naming_the_forms(text):
    with pytest.raises(UsageError, match="is not NAME, NAME/VERSION or NAME@ALIAS"):
        parse_ref(text)
