"""The README's configuration table is generated from the settings; it must not drift."""

from pathlib import Path

from gateway.config import reference_markdown


def test_readme_configuration_table_is_current():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    start = text.index("<!-- config-reference:start -->\n") + len("<!-- config-reference:start -->\n")
    end = text.index("<!-- config-reference:end -->")
    assert text[start:end] == reference_markdown(), "run `pgsni config reference` and paste it into README.md"


def test_readme_starts_with_the_two_commands():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = text.split("```", 2)[1]
    assert "./dev serve" in block and "./dev test" in block
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "./dev test" in ci
