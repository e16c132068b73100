"""Fresh output layers start at the click rate (``train.init_at_click_rate``)."""

import json
import math
import os

import pytest
import torch

from mkt_torchrec import registry
from mkt_torchrec.cli import main
from mkt_torchrec.models.base_rate import init_at_click_rate, output_biases
from mkt_torchrec.models.build import build_train_module, stage_entity
from mkt_torchrec.rundir import RunDir
from mkt_torchrec.training import checkpoint
from mkt_torchrec.training.mem_transfer import load_unsharded

from tests.conftest import QUICKSTART, set_flags, small_config

CLICKS, ROWS = {"source": 300, "target": 100}, {"source": 1000, "target": 1000}


def _logit(p):
    return math.log(p / (1 - p))


@pytest.mark.parametrize("name", [n for n in registry.names() if registry.get(n).made_as is None])
def test_every_models_logit_bias_starts_at_its_entities_click_rate(name):
    """Every registered model names the bias of each entity's logit, and each starts at the click rate of the
    rows its stage trains on: an entity's own rate for a tower of its own, the pooled rate for a shared one."""
    spec = registry.get(name)
    cfg = spec.config(small_config())
    for stage in spec.stages:
        torch.manual_seed(0)
        module = build_train_module(cfg, stage, device=torch.device("cpu"))
        entity = stage_entity(cfg, stage)
        trained = [entity] if entity else ["source", "target"]
        applied = init_at_click_rate(module, CLICKS, {e: ROWS[e] for e in trained})
        biases = output_biases(module)
        assert biases is not None, name
        if name in ("mkt", "no_hfa", "no_pdl") and stage == "tem" and cfg.model.tem.mem_logit:
            assert applied == {}  # the TEM is a correction to the MEM's logit: it starts at 0
            continue
        assert set(applied) == set(trained) & set(biases), (name, stage, applied)
        for e in applied:
            shared = [o for o in trained if o in biases and biases[o].data_ptr() == biases[e].data_ptr()]
            rate = sum(CLICKS[o] for o in shared) / sum(ROWS[o] for o in shared)
            assert biases[e].flatten().tolist() == pytest.approx([_logit(rate)] * biases[e].numel()), (name, e)


def test_a_model_without_the_hook_keeps_its_initialisation():
    layer = torch.nn.Linear(3, 1)
    before = layer.bias.clone()
    assert init_at_click_rate(layer, CLICKS, ROWS) == {} and torch.equal(layer.bias, before)


def test_a_new_run_starts_at_the_click_rate_of_its_train_rows(small_dataset, tmp_path):
    """End to end (one rank): the single-domain MLP's first checkpoint (after one step at dense_lr 1e-3) holds a
    logit bias within one Adam step of logit(click rate) of the train split's target rows, from the manifest's
    click counts; with train.init_at_click_rate=false it does not."""
    manifest = json.load(open(os.path.join(small_dataset, "manifest.json")))
    rate = manifest["clicks"]["train"]["target"] / manifest["rows"]["train"]["target"]
    assert 0 < rate < 0.5
    biases = {}
    for flag in ("true", "false"):
        run = str(tmp_path / flag)
        sets = set_flags("model.name=mlp", "train.max_steps=1", f"train.init_at_click_rate={flag}",
                         "train.checkpoint_every=1")
        assert main(["train", "--config", QUICKSTART, *sets, "--stage", "tem", "--data", small_dataset,
                     "--run-dir", run, "--nproc", "1"]) == 0
        module = load_unsharded(RunDir(run).config(), "tem", checkpoint.latest_checkpoint(run))
        biases[flag] = float(output_biases(module)["target"].detach())
    assert biases["true"] == pytest.approx(_logit(rate), abs=2e-3)
    assert abs(biases["false"] - _logit(rate)) > 0.5
