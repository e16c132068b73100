import copy

import numpy as np
import pytest
import torch

from mkt_torchrec.config import HFAConfig
from mkt_torchrec.data.reader import ParquetReader
from mkt_torchrec.models.mkt import MEM, TEM, MKTTarget, knowledge_dims
from mkt_torchrec.models.serving import export_serving, load_serving, padded_ids, serving_keys
from mkt_torchrec.models.losses import MEMTrain, TEMTrain, pdl_gamma
from mkt_torchrec.modules.hfa import HFA

from tests.conftest import small_config


@pytest.fixture(scope="module")
def cfg():
    return small_config("data.batch_size=64")


@pytest.fixture(scope="module")
def batches(small_dataset, cfg):
    reader = ParquetReader(small_dataset, "train", cfg.schema, cfg.data)
    it = iter(reader)
    return [next(it) for _ in range(4)]


def _target_batch(small_dataset, cfg, split="test"):
    return next(iter(ParquetReader(small_dataset, split, cfg.schema, cfg.data, entity="target", training=False)))


def _subset(batch, mask):
    """A Batch with only the rows in mask (rebuilt through the KJT)."""
    from mkt_torchrec.data.batch import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    jts = batch.sparse_features.to_dict()
    keys = list(jts)
    idx = mask.nonzero().squeeze(1)
    vals, lens = [], []
    for k in keys:
        jt = jts[k]
        off = jt.offsets()
        for i in idx.tolist():
            vals.append(jt.values()[off[i]: off[i + 1]])
            lens.append(int(off[i + 1] - off[i]))
    kjt = KeyedJaggedTensor(keys=keys, values=torch.cat(vals), lengths=torch.tensor(lens))
    return Batch(kjt, batch.dense_features[idx], batch.labels[idx], batch.entity[idx], batch.user_id[idx])


def _mem_with(cfg, ablation):
    """(model config with ``ablation``, a MEM built from it with seed 0)."""
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.ablation = ablation
    torch.manual_seed(0)
    return model_cfg, MEM(cfg.schema, model_cfg)


def test_mem_shapes_for_mixed_and_single_entity_batches(cfg, batches):
    torch.manual_seed(0)
    mem = MEM(cfg.schema, cfg.model).eval()
    b = batches[0]
    assert set(b.entity.tolist()) == {0, 1}
    out = mem(b.sparse_features, b.dense_features, b.entity)
    n = len(b)
    assert out.logits.shape == (n,) and out.g_com.shape == (n, 64) and out.g_ind.shape == (n, 64)
    assert out.hfa_scores["source"].shape == (n, 3)  # price_bucket, condition, log_price
    assert out.hfa_scores["target"].shape == (n, 2)  # style, post_length
    for code in (0, 1):
        sub = _subset(b, b.entity == code)
        o = mem(sub.sparse_features, sub.dense_features, sub.entity)
        torch.testing.assert_close(o.logits, out.logits[b.entity == code], rtol=1e-5, atol=1e-5)
        name = ("source", "target")[code]
        torch.testing.assert_close(o.hfa_scores[name], out.hfa_scores[name][b.entity == code], rtol=1e-5, atol=1e-5)


def test_hfa_scores_are_in_open_interval_0_2():
    torch.manual_seed(0)
    hfa = HFA(16, [8, 8, 4], HFAConfig())
    out = hfa(torch.randn(256, 16), torch.randn(256, 20))
    assert out.scores.shape == (256, 3)
    assert (out.scores > 0).all() and (out.scores < 2).all() and out.scores.std() > 0
    huge = hfa(torch.randn(256, 16) * 50, torch.randn(256, 20) * 50).scores  # float32 sigmoid saturates
    assert torch.isfinite(huge).all() and (huge >= 0).all() and (huge <= 2).all()
    eq3 = HFA(16, [8, 8, 4], HFAConfig(cross_input="eq3"))
    assert eq3.explicit.kernels[0].shape[0] == 20 and hfa.explicit.kernels[0].shape[0] == 36


def test_softmax_hfa_scores_average_one_so_a_feature_gains_only_at_the_others_expense():
    torch.manual_seed(0)
    hfa = HFA(16, [8, 8, 4], HFAConfig(score="softmax"))
    out = hfa(torch.randn(256, 16), torch.randn(256, 20))
    torch.testing.assert_close(out.scores.mean(-1), torch.ones(256))
    assert (out.scores > 0).all() and out.scores.std() > 0
    plain = HFA(16, [8, 8, 4], HFAConfig())  # the same weights, Eq. 4's independent scores
    plain.load_state_dict(hfa.state_dict())
    assert not torch.allclose(plain(torch.ones(2, 16), torch.ones(2, 20)).scores.mean(-1), torch.ones(2))


def test_fixed_scale_hfa_leaves_a_score_nothing_to_be_undone_by():
    """model.hfa.fixed_scale: rescaling a categorical feature's embedding or its block of the alignment layer
    changes nothing (so only the score sets the feature's weight); a dense block keeps its size."""
    torch.manual_seed(0)
    spec_dims = [8, 8, 4]  # two categorical features, one dense (the last block)
    hfa = HFA(16, spec_dims, HFAConfig(fixed_scale=True), dense_blocks=1)
    context, spec = torch.randn(64, 16), torch.randn(64, 20)
    out = hfa(context, spec)
    grown = spec.clone()
    grown[:, 8:16] *= 7.0  # the second categorical feature's embedding grows
    torch.testing.assert_close(hfa(context, grown).q, out.q)
    torch.testing.assert_close(hfa(context, grown).scores, out.scores)
    with torch.no_grad():
        hfa.align_in.weight[:, :8] *= 5.0  # the first feature's block of the alignment layer grows
    torch.testing.assert_close(hfa(context, spec).q, out.q)
    dense_grown = spec.clone()
    dense_grown[:, 16:] *= 7.0
    assert not torch.allclose(hfa(context, dense_grown).q, out.q)
    plain = HFA(16, spec_dims, HFAConfig())  # the paper's HFA: an embedding's size passes through
    assert not torch.allclose(plain(context, grown).q, plain(context, spec).q)
    traced = torch.fx.symbolic_trace(hfa)  # TorchRec's train pipeline FX-traces the dense forward
    torch.testing.assert_close(traced(context, spec).q, hfa(context, spec).q)


def test_fixed_scale_uses_each_dense_feature_vector_at_unit_norm(cfg, batches):
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.hfa.fixed_scale = True
    torch.manual_seed(0)
    mem = MEM(cfg.schema, model_cfg)
    assert mem.group_arch.dense_weight is not None  # the schema has a dense specific feature (log_price)
    b = batches[1]
    out = mem(b.sparse_features, b.dense_features, b.entity)
    with torch.no_grad():
        mem.group_arch.dense_weight *= 3.0
    torch.testing.assert_close(mem(b.sparse_features, b.dense_features, b.entity).logits, out.logits)


def test_pdl_range_and_gradients_reach_cke_and_extractors(cfg, batches):
    torch.manual_seed(0)
    mem = MEM(cfg.schema, cfg.model)
    b = batches[1]
    out = mem(b.sparse_features, b.dense_features, b.entity)
    assert -2.0 <= float(out.pdl) <= 2.0
    out.pdl.backward()
    for name in ("cke", "extractors.source", "extractors.target"):
        grads = [p.grad for n, p in mem.named_parameters() if n.startswith(name) and p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), name


def test_pdl_of_one_entity_batch_uses_only_that_entity(cfg, batches):
    mem = MEM(cfg.schema, cfg.model)
    sub = _subset(batches[0], batches[0].entity == 1)
    out = mem(sub.sparse_features, sub.dense_features, sub.entity)
    expected = torch.nn.functional.cosine_similarity(out.g_com, out.g_ind, dim=-1).mean()
    torch.testing.assert_close(out.pdl, expected)


def test_squared_cosine_pdl_is_the_mean_squared_cosine(batches):
    cfg = small_config("data.batch_size=64", "model.pdl=squared_cosine")
    torch.manual_seed(0)
    mem = MEM(cfg.schema, cfg.model)
    sub = _subset(batches[0], batches[0].entity == 1)
    out = mem(sub.sparse_features, sub.dense_features, sub.entity)
    cosine = torch.nn.functional.cosine_similarity(out.g_com, out.g_ind, dim=-1)
    torch.testing.assert_close(out.pdl, (cosine ** 2).mean())
    assert float(cosine.mean()) ** 2 < float((cosine ** 2).mean())  # not the square of the paper's term


@pytest.mark.parametrize("ablation", ["none", "no_hfa"])
def test_hfa_score_penalty_adds_the_mean_own_entity_score(ablation, cfg, batches):
    """model.hfa.score_penalty: loss = the paper's loss + penalty x (mean score of the source rows, each scored
    as a source row + the same for target rows), and its gradient reaches the scoring layer; nothing under
    no_hfa (no scores)."""
    model_cfg, mem = _mem_with(cfg, ablation)
    b = batches[0]
    plain, _ = MEMTrain(mem, pdl_gamma(model_cfg))(b)
    penalised, _ = MEMTrain(mem, pdl_gamma(model_cfg), score_penalty=0.5)(b)
    scores = mem(b.sparse_features, b.dense_features, b.entity).hfa_scores
    expected = plain
    if ablation == "none":
        for code, e in enumerate(("source", "target")):
            mine = b.entity == code
            assert mine.any()
            expected = expected + 0.5 * scores[e][mine].mean()
        penalised.backward()
        assert mem.hfa["target"].score.bias.grad.abs().sum() > 0
    torch.testing.assert_close(penalised, expected)


def test_hfa_score_penalty_must_not_be_negative():
    with pytest.raises(ValueError, match="model.hfa.score_penalty"):
        small_config("model.hfa.score_penalty=-0.1")


def test_mem_logit_tem_starts_as_the_mems_target_tower(small_dataset):
    cfg = small_config("data.batch_size=64", "model.tem.mem_logit=true")
    torch.manual_seed(0)
    mem = MEM(cfg.schema, cfg.model).eval()
    model = MKTTarget(TEM(cfg.schema, cfg.model, knowledge_dims(mem)), mem).eval()
    b = _target_batch(small_dataset, cfg)
    with torch.no_grad():
        mine = model(b.sparse_features, b.dense_features)
        theirs = mem.target_logits_from(mem.sparse_arch(b.sparse_features), b.dense_features)
    torch.testing.assert_close(mine, theirs)
    assert float(theirs.std()) > 0
    step = TEMTrain(MKTTarget(model.tem, mem).train())
    loss, _ = step(b)
    loss.backward()
    assert all(p.grad is None for p in mem.parameters())
    assert float(model.tem.top[-1].weight.grad.abs().sum()) > 0  # the zero-started correction learns


def test_gates_and_knowledge_shapes(cfg, small_dataset):
    mem = MEM(cfg.schema, cfg.model)
    kd = knowledge_dims(mem)
    tem = TEM(cfg.schema, cfg.model, kd)
    b = _target_batch(small_dataset, cfg)
    k = mem.knowledge_from(mem.sparse_arch(b.sparse_features), b.dense_features)
    n = len(b)
    assert k.user.shape == (n, kd.user) and k.seq.shape == (n, kd.seq) and k.shared.shape == (n, kd.shared)
    assert k.cross.shape == (n, 64)
    assert tem.gates["cross"](k.cross).shape == (n, cfg.model.tem.dnn[cfg.model.tem.cross_layer])
    assert tem.gates["user"](k.user).shape == (n, tem.group_arch.user_dim)
    assert tem(b.sparse_features, b.dense_features, k).shape == (n,)
    with pytest.raises(ValueError, match="knowledge"):
        tem(b.sparse_features, b.dense_features, None)


def test_frozen_mem_is_unchanged_by_a_tem_step(cfg, small_dataset):
    torch.manual_seed(0)
    mem = MEM(cfg.schema, cfg.model)
    before = copy.deepcopy(mem.state_dict())
    model = MKTTarget(TEM(cfg.schema, cfg.model, knowledge_dims(mem)), mem)
    model.train()
    assert not mem.training and all(not p.requires_grad for p in mem.parameters())
    step = TEMTrain(model)
    trainable = [p for p in step.parameters() if p.requires_grad]
    assert {id(p) for p in trainable}.isdisjoint({id(p) for p in mem.parameters()})
    opt = torch.optim.Adagrad(trainable, lr=0.1)
    tem_before = copy.deepcopy(model.tem.state_dict())
    reader = ParquetReader(small_dataset, "train", cfg.schema, cfg.data, entity="target")
    for _, batch in zip(range(3), reader):
        loss, _ = step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mem.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in mem.parameters())
    assert not any(torch.equal(tem_before[k], v) for k, v in model.tem.state_dict().items()
                   if k.startswith("bottom"))  # while the TEM did move
    assert len(opt.state) == len(trainable)  # optimizer state only for TEM parameters


@pytest.mark.parametrize("ablation", ["none", "no_hfa", "no_pdl", "no_mem_pretrain", "no_tem_finetune", "mem_logit"])
def test_every_ablation_trains_and_its_serving_export_equals_training(ablation, small_dataset, tmp_path):
    if ablation == "mem_logit":  # not an ablation: the TEM adds the MEM's target logit (it serves its tower)
        cfg = small_config("data.batch_size=64", "model.tem.mem_logit=true")
        ablation = "none"
    else:
        cfg = small_config("data.batch_size=64", f"model.ablation={ablation}")
    torch.manual_seed(0)
    mem = MEM(cfg.schema, cfg.model)
    gamma = pdl_gamma(cfg.model)
    assert (gamma == 0.0) == (ablation == "no_pdl")
    mem_step = MEMTrain(mem, gamma)
    opt = torch.optim.Adam(mem_step.parameters(), lr=1e-3)
    for _, batch in zip(range(2), ParquetReader(small_dataset, "train", cfg.schema, cfg.data)):
        loss, out = mem_step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.testing.assert_close(out.loss, out.bce + gamma * out.pdl)
    if ablation == "no_tem_finetune":
        final = mem
    else:
        with_mem = ablation != "no_mem_pretrain"
        tem = TEM(cfg.schema, cfg.model, knowledge_dims(mem) if with_mem else None)
        final = MKTTarget(tem, mem if with_mem else None)
        assert (tem.gates is None) == (not with_mem)
        step = TEMTrain(final)
        opt = torch.optim.Adam([p for p in step.parameters() if p.requires_grad], lr=1e-3)
        for _, batch in zip(range(2), ParquetReader(small_dataset, "train", cfg.schema, cfg.data, entity="target")):
            loss, _ = step(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    final.eval()
    b = _target_batch(small_dataset, cfg)
    with torch.no_grad():
        if ablation == "no_tem_finetune":
            ref = torch.sigmoid(mem(b.sparse_features, b.dense_features, b.entity).logits)
        else:
            ref = torch.sigmoid(final(b.sparse_features, b.dense_features))
    ids = padded_ids(b.sparse_features, cfg.schema, serving_keys(cfg.schema))
    path = export_serving(cfg.schema, final, str(tmp_path / "serving"), ids, b.dense_features)
    served = load_serving(path)
    torch.testing.assert_close(served(ids, b.dense_features), ref, rtol=1e-5, atol=1e-6)
    one = {k: v[:1] for k, v in ids.items()}  # a batch of one works too (dynamic batch dim)
    torch.testing.assert_close(served(one, b.dense_features[:1]), ref[:1], rtol=1e-5, atol=1e-6)
    state = list(torch.export.load(path).state_dict) + [n for n, _ in torch.export.load(path).module().named_buffers()]
    source_only = ("hfa.source", "towers.source", "extractors.source", "table__price_bucket", "table__condition")
    assert not [k for k in state if any(s in k for s in source_only)], "serving carries source-entity modules"
    assert any("table__item_id" in k for k in state)


@pytest.mark.parametrize("ablation", ["none", "no_hfa"])
def test_mem_step_output_carries_its_hfa_scores_source_then_target(ablation, cfg, batches):
    """StepOutput.hfa: the MEM's scores of every row as a source row, then as a target row (in
    hfa_feature_names' order), detached; no columns under no_hfa; None for the stage-2 model."""
    from mkt_torchrec.models.losses import hfa_feature_names

    model_cfg, mem = _mem_with(cfg, ablation)
    b = batches[0]
    _, out = MEMTrain(mem, pdl_gamma(model_cfg))(b)
    names = hfa_feature_names(cfg.schema)
    assert names == {"source": ["price_bucket", "condition", "log_price"], "target": ["style", "post_length"]}
    if ablation == "no_hfa":
        assert out.hfa.shape == (len(b), 0)
    else:
        scores = mem(b.sparse_features, b.dense_features, b.entity).hfa_scores
        assert out.hfa.shape == (len(b), 5) and not out.hfa.requires_grad
        torch.testing.assert_close(out.hfa, torch.cat([scores["source"], scores["target"]], dim=1))
    step = TEMTrain(MKTTarget(TEM(cfg.schema, model_cfg, knowledge_dims(mem)), mem))
    assert step(_subset(b, b.entity == 1))[1].hfa is None


def test_mem_learns_from_reader_batches(small_dataset):
    cfg = small_config("data.batch_size=128")
    torch.manual_seed(0)
    mem = MEM(cfg.schema, cfg.model)
    step = MEMTrain(mem, pdl_gamma(cfg.model))
    opt = torch.optim.Adam(step.parameters(), lr=3e-3)
    reader = ParquetReader(small_dataset, "train", cfg.schema, cfg.data)
    losses = []
    for _ in range(3):
        for batch in reader:
            loss, out = step(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(out.bce))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < first - 0.05, (first, last)
