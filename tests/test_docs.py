"""What the README and docs/design.md state that the code also states, checked against the code: the
presets, the rule of l2_attention's backend "auto", the experiments `acf experiment` offers."""
import re
from pathlib import Path

from acf.experiment_names import EXPERIMENT_NAMES
from acf.models import PRESETS
from acf.ops.l2_attention import auto_rule

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DESIGN = (REPO / "docs" / "design.md").read_text()


def ticked(text: str) -> list[str]:
    """The names in a list such as "`a`, `b`, or `c`", in order."""
    return re.findall(r"`([^`]+)`", text)


def test_readme_lists_the_presets():
    row = next(line for line in README.splitlines() if line.startswith("| `acf.models` |"))
    listed = re.search(r"presets ((?:`[^`]+`(?:, )?)+)", row).group(1)
    assert ticked(listed) == list(PRESETS)


def test_docs_state_the_auto_rule_of_the_code():
    """auto_rule() is made from the constants _auto_backend tests (tests/test_l2_attention.py holds the
    behaviour); the docs quote it word for word."""
    row = next(line for line in README.splitlines() if line.startswith("| `acf.ops.l2_attention` |"))
    assert f'`"auto"`: {auto_rule()}' in row
    assert auto_rule() in " ".join(DESIGN.split())


def test_readme_lists_the_experiments():
    listed = re.search(r"`acf experiment NAME` \(([^)]*)\)", " ".join(README.split())).group(1)
    assert ticked(listed) == [*EXPERIMENT_NAMES, "all"]
