"""The registry of experiments: each entry is a notebook that exists, calls its package, and the
package follows the convention (claims table rows from `claim_results`)."""
import json

import pytest

from replication import paths
from replication.methods import EXPERIMENTS


@pytest.mark.parametrize("number", sorted(EXPERIMENTS))
def test_each_registered_experiment_is_the_one_its_notebook_calls(number):
    package = EXPERIMENTS[number]
    notebooks = sorted((paths.repo_root() / "notebooks").glob(f"{number}_*.ipynb"))
    assert len(notebooks) == 1, f"notebook {number} should exist once, found {notebooks}"
    cells = json.loads(notebooks[0].read_text())["cells"]
    source = "".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    short_name = package.__name__.rsplit(".", 1)[-1]
    assert f"from replication.methods import {short_name}" in source or package.__name__ in source
    assert callable(package.claim_results)
