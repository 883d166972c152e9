"""The README is true: its example output is what the demo prints, and its commands are CI's."""

from __future__ import annotations

import re
from pathlib import Path

from scripts.readme_example import README, demo_output, example, readme_example

ROOT = Path(__file__).resolve().parents[1]


def test_the_example_output_is_what_the_demo_prints():
    """Reruns the demo (about a minute and a half with the demo model cached): the same block,
    character for character, so the demo is reproducible and the README current."""
    assert readme_example(README.read_text()) == example(demo_output())


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^    (python3 -m venv .*)$", README.read_text(), re.M)
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == commands[1]


def test_the_readme_and_docs_link_only_into_the_repository():
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        assert "../shared" not in text and "SPEC.md" not in text and not re.search(r"\bissue\s*#?\d", text, re.I), page
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which is not in the repository"
