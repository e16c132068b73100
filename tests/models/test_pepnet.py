"""PEPNet (mkt_torchrec.models.baselines.pepnet): its gates against plain-PyTorch references, a row scored by its
own entity alone, and ``mkt train`` / ``evaluate`` / ``export`` at 1 and 2 ranks."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mkt_torchrec.cli import main
from mkt_torchrec.data.reader import ParquetReader
from mkt_torchrec.models.baselines import build_train_module
from mkt_torchrec.models.baselines.pepnet import EPNet, GateNU, PEPNetArch, PPNet, prior_features
from mkt_torchrec.models.serving import load_serving, padded_ids, serving_keys
from mkt_torchrec.rundir import RunDir
from mkt_torchrec.training import checkpoint
from mkt_torchrec.training.mem_transfer import load_unsharded

from tests.conftest import QUICKSTART, SMALL, set_flags, small_config
from tests.models.test_baselines import _batch, _rows

MODEL = ["model.name=pepnet", "data.batch_size=64"]


def _force_to_one(gate: GateNU) -> None:
    """2 * sigmoid(0) = 1 for every input."""
    with torch.no_grad():
        gate.out.weight.zero_()
        gate.out.bias.zero_()


# ------------------------------------------------------------------------------------------------------------
# The gates against plain-PyTorch references
# ------------------------------------------------------------------------------------------------------------


def test_gate_nu_is_gamma_times_a_sigmoid_of_a_relu_layer():
    torch.manual_seed(0)
    gate, x = GateNU(5, 3), torch.randn(7, 5)
    ref = 2.0 * torch.sigmoid(torch.relu(x @ gate.hidden.weight.T + gate.hidden.bias) @ gate.out.weight.T
                              + gate.out.bias)
    torch.testing.assert_close(gate(x), ref)
    with torch.no_grad():
        gate.out.weight.mul_(50.0)  # saturates both ways: the range is (0, 2), not (0, 1)
    g = gate(torch.randn(200, 5) * 10)
    assert g.shape == (200, 3) and g.min() >= 0 and g.max() <= 2 and g.max() > 1.5 and g.min() < 0.5
    _force_to_one(gate)
    assert torch.equal(gate(x), torch.ones(7, 3))


def test_epnet_scales_each_field_by_its_own_gate_and_stops_the_gradient_into_the_gates_input():
    torch.manual_seed(0)
    ep = EPNet([4, 2, 3], domain_dim=2)
    fields = [torch.randn(6, d, requires_grad=True) for d in (4, 2, 3)]
    domain = torch.randn(6, 2)
    out = ep(fields, domain)
    gates = ep.gate(torch.cat([domain] + [f.detach() for f in fields], dim=-1))  # (6, 3)
    assert gates.shape == (6, 3)
    for i, (lo, hi) in enumerate(((0, 4), (4, 6), (6, 9))):
        torch.testing.assert_close(out[:, lo:hi], fields[i] * gates[:, i: i + 1])
    weight = torch.randn(6, 9)
    (out * weight).sum().backward()
    for i, (lo, hi) in enumerate(((0, 4), (4, 6), (6, 9))):  # the direct path only: d out / d field = its gate
        torch.testing.assert_close(fields[i].grad, weight[:, lo:hi] * gates[:, i: i + 1].detach())
    _force_to_one(ep.gate)
    torch.testing.assert_close(ep(fields, domain), torch.cat(fields, dim=-1))


def _ppnet_loop(pp: PPNet, x: torch.Tensor, prior: torch.Tensor, entity: torch.Tensor) -> torch.Tensor:
    """Row by row: the row's own entity's tower, each hidden output (after ReLU) times its slice of the layer's
    gate over [prior, sg(x)]."""
    out = []
    for b in range(len(x)):
        code = int(entity[b])
        tower = pp.towers[("source", "target")[code]]
        z = torch.cat([prior[b], x[b].detach()]).unsqueeze(0)
        h = x[b: b + 1]
        for i, layer in enumerate(tower):
            h = h @ layer.weight.T + layer.bias
            if i < len(tower) - 1:
                width = layer.out_features
                h = torch.relu(h) * pp.gates[i](z)[:, code * width: (code + 1) * width]
        out.append(h[0, 0])
    return torch.stack(out)


def test_ppnet_gates_each_hidden_layer_of_the_rows_own_tower():
    torch.manual_seed(0)
    pp = PPNet(6, 3, [5, 4, 1])
    x = torch.randn(8, 6, requires_grad=True)
    prior, entity = torch.randn(8, 3), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    got = pp(x, prior, entity)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = _ppnet_loop(pp, x_ref, prior, entity)
    torch.testing.assert_close(got, ref)
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)  # sg(x) in the gates' input: x trains through the towers only


def test_ppnet_with_every_gate_forced_to_one_is_the_plain_mlp():
    torch.manual_seed(0)
    pp = PPNet(6, 3, [5, 4, 1])
    for gate in pp.gates:
        _force_to_one(gate)
    x, prior, entity = torch.randn(8, 6), torch.randn(8, 3), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    plain = {}
    for e, tower in pp.towers.items():
        h = x
        for i, layer in enumerate(tower):
            h = layer(h)
            h = torch.relu(h) if i < len(tower) - 1 else h
        plain[e] = h.squeeze(-1)
    torch.testing.assert_close(pp(x, prior, entity), torch.where(entity == 1, plain["target"], plain["source"]))
    assert not torch.allclose(plain["source"], plain["target"])  # two towers: the entity picks the row's


def test_the_prior_is_the_user_and_item_ids_and_every_tower_ends_in_a_logit():
    cfg = small_config(*MODEL)
    assert prior_features(cfg.schema) == ["user_id", "item_id"]
    arch = PEPNetArch(cfg.schema, [16, 8], [4, 1])
    assert [len(g.out.bias) for g in arch.ppnet.gates] == [2 * 16, 2 * 8, 2 * 4]
    assert arch.epnet.gate.out.out_features == len(arch.fields.dims)  # one gate value per field
    assert {e: b.shape for e, b in arch.output_biases().items()} == {"source": (1,), "target": (1,)}


# ------------------------------------------------------------------------------------------------------------
# A row is scored by its own entity alone
# ------------------------------------------------------------------------------------------------------------


def test_a_row_is_scored_by_its_own_entity_alone(small_dataset):
    """In a mixed batch a target row's logit is the one it gets in a batch of target rows only (eval mode), and
    the entity matters: scored as a source row it gets another."""
    cfg = small_config(*MODEL)
    torch.manual_seed(0)
    model = build_train_module(cfg, "mem").model.eval()
    batch = _batch(small_dataset, cfg, None)
    target = [i for i, e in enumerate(batch.entity.tolist()) if e == 1]
    assert 0 < len(target) < len(batch)
    with torch.no_grad():
        mixed = model(batch.sparse_features, batch.dense_features, batch.entity)
        alone = _rows(batch, target)
        only = model(alone.sparse_features, alone.dense_features, alone.entity)
        as_source = model(alone.sparse_features, alone.dense_features, torch.zeros_like(alone.entity))
    torch.testing.assert_close(only, mixed[target], rtol=1e-5, atol=1e-5)
    assert (as_source - only).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------------------
# mkt train / evaluate / export, 1 and 2 ranks
# ------------------------------------------------------------------------------------------------------------


def _flags(*extra):
    return ["--config", QUICKSTART, *set_flags(*SMALL, *MODEL, *extra)]


@pytest.mark.parametrize("nproc", [1, 2])
def test_train_evaluate_export_and_the_export_scores_like_the_trained_model(small_dataset, tmp_path, nproc):
    """1 rank in this process (a world of one), 2 ranks as local processes (gloo, sharded tables); the export is
    the single-process step. Its scores equal the trained model's (rebuilt unsharded from the checkpoint) on a
    test batch, and, over every target test row, the sharded evaluation's."""
    run = str(tmp_path / "pepnet")
    launch = [] if nproc == 1 else ["--nproc", str(nproc)]
    assert main(["train", *_flags("train.max_steps=3"), "--stage", "mem", "--data", small_dataset,
                 "--run-dir", run, *launch]) == 0
    losses = [json.loads(line)["loss"] for line in open(os.path.join(run, "metrics.jsonl")) if '"loss"' in line]
    assert losses and all(np.isfinite(losses))
    assert json.load(open(os.path.join(run, "plan.json")))["world_size"] == nproc

    assert main(["evaluate", "--config", QUICKSTART, "--set", "data.batch_size=256", "--run-dir", run,
                 "--data", small_dataset, *launch]) == 0
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    test_rows = json.load(open(os.path.join(small_dataset, "manifest.json")))["rows"]["test"]
    for e in ("source", "target"):  # a joint model: both entities' rows, each scored once
        assert metrics[e]["rows"] == test_rows[e] and 0.0 <= metrics[e]["auc"] <= 1.0
    assert metrics["world_size"] == nproc

    assert main(["export", "--run-dir", run]) == 0
    exported = load_serving(os.path.join(run, "serving", "model.pt2"))
    cfg = RunDir(run).config()
    keys = serving_keys(cfg.schema)
    model = load_unsharded(cfg, "mem", checkpoint.latest_checkpoint(run)).model.eval()
    batch = _batch(small_dataset, cfg, "target", split="test")
    with torch.no_grad():
        reference = torch.sigmoid(model(batch.sparse_features, batch.dense_features, batch.entity))
        served = exported(padded_ids(batch.sparse_features, cfg.schema, keys), batch.dense_features)
    torch.testing.assert_close(served, reference, rtol=1e-5, atol=1e-6)

    scores = []  # the exported model over every target test row
    with torch.no_grad():
        for b in ParquetReader(small_dataset, "test", cfg.schema, cfg.data, training=False, entity="target"):
            scores.append(exported(padded_ids(b.sparse_features, cfg.schema, keys), b.dense_features))
    predicted = pq.ParquetDataset(os.path.join(run, "predictions")).read().to_pandas()
    evaluated = np.sort(predicted.loc[predicted["entity"] == "target", "score"].to_numpy())
    np.testing.assert_allclose(np.sort(torch.cat(scores).numpy()), evaluated, rtol=0, atol=1e-5)
