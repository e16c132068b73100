"""What makes an epoch the best (``train.stop_on``): log loss by default; GAUC only among epochs that rank better
than chance and predict better than the constant base rate (the default); or log loss."""

import math

import pytest

from mkt_torchrec.config import ConfigError
from mkt_torchrec.training.recipe import is_better, is_eligible
from mkt_torchrec.evaluation.report_flags import base_rate_logloss

from tests.conftest import small_config


def _epoch(gauc, auc, logloss, rate=0.2):
    return {"gauc": gauc, "auc": auc, "logloss": logloss, "base_logloss": base_rate_logloss(rate)}


def _best_epoch(epochs, stop_on, slack=0.01):
    best, best_i, lowest = None, None, None
    for i, m in enumerate(epochs):
        lowest = min(m["logloss"], lowest if lowest is not None else math.inf)
        if is_eligible(m, stop_on, lowest, slack) and is_better(m, best, stop_on):
            best, best_i = m, i
    return best_i


def test_base_rate_log_loss_is_the_click_rates_entropy():
    assert base_rate_logloss(0.5) == pytest.approx(math.log(2))
    assert base_rate_logloss(0.19) == pytest.approx(-(0.19 * math.log(0.19) + 0.81 * math.log(0.81)))
    assert base_rate_logloss(0.0) == pytest.approx(0.0, abs=1e-6) and base_rate_logloss(None) is None


def test_gauc_never_picks_an_epoch_below_chance_or_worse_than_the_base_rate():
    """The held-out Tenrec case: a TEM epoch with the best GAUC but pooled AUC 0.494 (ranks base rates
    backwards), and one with a log loss above the constant predictor's, are never the best by GAUC."""
    base = base_rate_logloss(0.2)
    epochs = [_epoch(0.660, 0.70, base - 0.02),
              _epoch(0.667, 0.494, base - 0.01),  # below chance
              _epoch(0.670, 0.72, base + 0.01),  # worse than predicting the click rate
              _epoch(0.664, 0.71, base - 0.03)]
    assert [is_eligible(e, "gauc") for e in epochs] == [True, False, False, True]  # (no log loss guard yet)
    assert _best_epoch(epochs, "gauc") == 3
    assert _best_epoch(epochs, "logloss") == 3
    assert _best_epoch(epochs[:3], "logloss") == 0


def test_gauc_may_not_be_bought_with_log_loss():
    """The demo's TEM alone: validation GAUC still rising while log loss climbs 9% above its lowest (and just
    under the base rate's): that epoch is not the best by GAUC; within train.logloss_slack it would be."""
    base = base_rate_logloss(0.1931)
    epochs = [_epoch(0.686, 0.689, 0.4525, 0.1931), _epoch(0.718, 0.723, 0.4439, 0.1931),
              _epoch(0.7285, 0.716, 0.4892, 0.1931)]
    assert all(e["logloss"] < base for e in epochs)
    assert _best_epoch(epochs, "gauc") == 1
    assert _best_epoch(epochs, "gauc", slack=0.2) == 2


def test_a_tie_keeps_the_earlier_epoch():
    epochs = [_epoch(0.66, 0.7, 0.40), _epoch(0.66, 0.7, 0.40)]
    assert _best_epoch(epochs, "logloss") == 0 and _best_epoch(epochs, "gauc") == 0


def test_a_checkpoint_of_an_older_release_records_no_log_loss():
    assert is_better(_epoch(0.6, 0.7, 0.4), {"step": 3, "epoch": 0, "gauc": 0.7, "auc": 0.7}, "logloss")


def test_stop_on_is_guarded_gauc_by_default_and_checked():
    assert small_config().train.stop_on == "gauc"
    assert small_config("train.stop_on=logloss").train.stop_on == "logloss"
    with pytest.raises(ConfigError, match="train.stop_on"):
        small_config("train.stop_on=auc")
