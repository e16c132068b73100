"""tools/power.py: seeds and test users for an interval of a given half-width, from a report.json."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _report(tmp_path, sd, n, user_ci):
    report = {"baseline": "finetune", "confidence": 0.95, "models": [
        {"name": "mkt", "seed_level": {"gauc": {"n": n, "mean": 0.001, "sd": sd, "t": {3: 4.302652729749462,
                                                                                          10: 2.262157162740992}[n],
                                                "confidence": 0.95}},
         "user_level": {"gauc_diff_ci": user_ci, "users_evaluated": 766}}]}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    return str(path)


def _power(*args):
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "power.py"), *args], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_seeds_and_users_for_the_half_width(tmp_path):
    """sd 0.004 over seeds: t(n-1) * 0.004 / sqrt(n) <= 0.005 / sqrt(2) = 0.003536 first holds at n = 8 (t(6) =
    2.447 gives 0.00370 at n = 7; t(7) = 2.365 gives 0.00334); a user-level half-width of 0.0118 needs
    (0.0118 / 0.003536)^2 = 11.1x the users."""
    r = _power(_report(tmp_path, 0.004, 3, [-0.0108, 0.0128]), "--model", "mkt", "--half-width", "0.005")
    assert r["seeds_needed"] == 8
    assert r["users_factor_needed"] == pytest.approx((0.0118 / (0.005 / math.sqrt(2))) ** 2)
    assert r["users_needed"] == math.ceil(r["users_factor_needed"] * 766)
    assert r["half_width"] == pytest.approx(math.hypot(4.302652729749462 * 0.004 / math.sqrt(3), 0.0118))


def test_a_model_without_intervals_is_a_one_line_error(tmp_path):
    path = _report(tmp_path, 0.004, 3, [-0.01, 0.01])
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "power.py"), path, "--model", "din"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "no model 'din'" in done.stderr
