"""README's two set-up commands are exactly what CI runs."""

import re

from tests.conftest import ROOT


def test_readme_setup_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up.*?```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(block) == 2, block
    ci = (ROOT / ".ci/run").read_text().splitlines()
    install, test = block
    assert ci.index(install) < ci.index(test)
