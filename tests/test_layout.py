"""The package's shape: no module grows past about 900 lines (a module that does that holds two jobs)."""

import pathlib

from tests.conftest import REPO

MAX_LINES = 910  # "about 900": the largest today is config.py


def test_no_package_module_is_over_about_900_lines():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines())
             for p in pathlib.Path(REPO, "mkt_torchrec").rglob("*.py")}
    assert sizes and not {p: n for p, n in sizes.items() if n > MAX_LINES}, max(sizes.items(), key=lambda kv: kv[1])
