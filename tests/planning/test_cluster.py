"""Cluster presets: their datasheet figures in TorchRec's units, GB sizes, specs, ``--compare cluster=``, the
trainer's planning path, and plans that change with the hardware."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torchrec.distributed.planner import constants as trec

import mkt_torchrec.planning.plan as plan_lib
from mkt_torchrec.cli import main
from mkt_torchrec.config import load_config
from mkt_torchrec.planning.embedding_optimizer import attach_embedding_optimizer
from mkt_torchrec.planning.plan import make_plan, plan_module, topology
from mkt_torchrec.models.build import build_train_module

from tests.conftest import QUICKSTART, REPO

INDUSTRIAL = os.path.join(REPO, "configs", "industrial.yaml")


def _module(cfg, stage="mem"):
    m = build_train_module(cfg, stage, torch.device("meta"))
    attach_embedding_optimizer(m, cfg, stage)
    return m


def _bandwidths(topo):
    return {"hbm_mem_bw": topo.hbm_mem_bw, "intra_host_bw": topo.comms_bandwidths.intra_host_bw,
            "inter_host_bw": topo.comms_bandwidths.inter_host_bw, "hbm_to_ddr_mem_bw": topo.hbm_to_ddr_mem_bw}


def test_presets_give_torchrec_their_datasheet_figures_in_bytes_per_ms():
    from mkt_torchrec.planning.cluster import PRESETS, parse_cluster

    # TorchRec's unit is bytes per millisecond (constants.py: "600 * 1024 * 1024 * 1024 / 1000  # bytes/ms"):
    # its own defaults, written in our spec syntax, come back exactly
    spec = "custom:hbm=80GB,hbm_bw=897GiB/s,intra=600GiB/s,inter=12.5GiB/s,pcie=32GiB/s"
    assert _bandwidths(topology(16, 8, "cuda", 80, 60, parse_cluster(spec))) == pytest.approx({
        "hbm_mem_bw": trec.HBM_MEM_BW, "intra_host_bw": trec.INTRA_NODE_BANDWIDTH,
        "inter_host_bw": trec.CROSS_NODE_BANDWIDTH, "hbm_to_ddr_mem_bw": trec.HBM_TO_DDR_MEM_BW}, rel=1e-12)
    # datasheets, per GPU and direction: 1 GB/s = 10^9 B / 1000 ms = 10^6 bytes per ms
    expected = {"a100-ib": (80, 2.039e9, 300e6, 25e6, 32e6), "h100-ib": (80, 3.35e9, 450e6, 50e6, 64e6),
                "h200-ib": (141, 4.8e9, 450e6, 50e6, 64e6)}
    assert set(PRESETS) == set(expected)
    for name, (hbm_gb, hbm_bw, intra, inter, pcie) in expected.items():
        cluster = parse_cluster(name)
        topo = topology(16, 8, "cuda", cluster.hbm_gb, 60, cluster)
        assert _bandwidths(topo) == pytest.approx({"hbm_mem_bw": hbm_bw, "intra_host_bw": intra,
                                                   "inter_host_bw": inter, "hbm_to_ddr_mem_bw": pcie}), name
        assert topo.devices[0].storage.hbm == hbm_gb * 10**9, name
    # what the cost model does with it (bytes / bw): 1 GB through one H100's 400 Gb/s NIC takes 20 ms
    one_gb_ms = 1e9 / topology(16, 8, "cuda", 80, 60, parse_cluster("h100-ib")).comms_bandwidths.inter_host_bw
    assert one_gb_ms == pytest.approx(20.0)


def test_hbm_gb_80_means_80e9_bytes_and_the_planner_alone_reserves_headroom(tmp_path):
    topo = topology(2, 2, "cuda", 80, 60)
    assert topo.devices[0].storage.hbm == 80 * 10**9 and topo.devices[0].storage.ddr == 60 * 10**9
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", QUICKSTART, "--world-size", "2", "--compute-device", "cuda",
                 "--hbm-gb", "80", "--out", str(out)]) == 0
    rank0 = json.load(open(out))["per_rank"][0]
    assert rank0["hbm_cap_gb"] == 80.0
    # TorchRec's HeuristicalStorageReservation keeps 15% free (plus the dense part and the batch): nothing more
    assert 0.15 * 80 <= rank0["hbm_reserved_gb"] < 0.15 * 80 + 0.5
    assert plan_lib.resolve_hardware(load_config(QUICKSTART)).hbm_gb == 80.0  # no cluster, no hbm_gb


def test_a_custom_spec_parses_and_a_bad_one_is_a_one_line_error_naming_the_bad_part(tmp_path, capsys):
    from mkt_torchrec.planning.cluster import parse_cluster

    c = parse_cluster("custom:hbm=141GB,hbm_bw=4.8TB/s,intra=450GB/s,inter=400Gb/s")
    assert (c.hbm_gb, c.hbm_bw, c.intra, c.inter, c.pcie) == (141, 4800, 450, 50, None)
    spec = "h100-ib:inter=200Gb/s,hbm=80GiB"
    hdr = parse_cluster(spec)
    assert (hdr.inter, hdr.hbm_gb, hdr.hbm_bw, hdr.name) == (25, 80 * 2**30 / 1e9, 3350, spec)
    out = str(tmp_path / "p.json")
    for spec, bad in [("h300-ib", "'h300-ib' is not a cluster preset"),
                      ("h100-ib:inter=50", "inter='50': expected a number and one of the units"),
                      ("h100-ib:nic=50GB/s", "'nic=50GB/s': expected key=value"),
                      ("custom:hbm=80GB,intra=450GB/s", "missing hbm_bw, inter")]:
        code = main(["plan", "--config", QUICKSTART, "--world-size", "2", "--cluster", spec, "--out", out])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and f"--cluster {spec!r}" in err and bad in err, err
    code = main(["plan", "--config", QUICKSTART, "--set", "train.planner.cluster=h100-ib:hbm=lots",
                 "--world-size", "2", "--out", out])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "train.planner.cluster: hbm='lots'" in err
    assert not os.path.exists(out)


def test_compare_plans_side_by_side_across_clusters(capsys):
    custom = "custom:hbm=80GB,hbm_bw=3.35TB/s,intra=450GB/s,inter=50GB/s,pcie=64GB/s"
    code = main(["plan", "--config", INDUSTRIAL, "--local-world-size", "8",
                 "--compare", f"cluster=a100-ib,h100-ib,h200-ib,{custom}", "world_size=16"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    rows = json.loads(lines[-1])["compare"]
    assert [(r["cluster"], r["hbm_cap_gb"], r["fits"]) for r in rows] == [
        ("a100-ib", 80, True), ("h100-ib", 80, True), ("h200-ib", 141, True), (custom, 80, True)]
    a100, h100, h200, same_as_h100 = (r["critical_path_ms"] for r in rows)
    assert a100 > h100 > h200 > 0  # slower network, NVLink and HBM cost more
    assert same_as_h100 == h100
    header = next(line for line in lines if line.startswith("world "))
    assert "cluster" in header and "HBM cap GB" in header
    assert any(line.startswith("141 GB HBM") and "cluster h200-ib" in line for line in lines)
    assert main(["plan", "--config", QUICKSTART, "--compare", "cluster=a100-ib,h100-ib:pcie=fast",
                 "world_size=2"]) == 2
    assert "cluster 'h100-ib:pcie=fast': pcie='fast'" in capsys.readouterr().err


def test_the_trainers_make_plan_uses_the_configs_cluster(monkeypatch):
    seen = []
    real = plan_lib._plan_local

    def spy(module, sharder_list, topo, *args, **kwargs):
        seen.append(topo)
        return real(module, sharder_list, topo, *args, **kwargs)

    monkeypatch.setattr(plan_lib, "_plan_local", spy)
    cfg = load_config(QUICKSTART, ["train.planner.cluster=h200-ib"])
    plan = make_plan(_module(cfg), cfg, 2, 2, "cuda")  # what trainer.py calls
    (topo,) = seen
    assert topo.devices[0].storage.hbm == 141 * 10**9
    assert _bandwidths(topo) == pytest.approx({"hbm_mem_bw": 4.8e9, "intra_host_bw": 450e6, "inter_host_bw": 50e6,
                                               "hbm_to_ddr_mem_bw": 64e6})
    # the same plan as `mkt plan --cluster h200-ib` on a config without one
    plain = load_config(QUICKSTART)
    assert plan_module(_module(plain), plain, 2, 2, "cuda", cluster="h200-ib").plan.plan == plan.plan
    # train.planner.hbm_gb, when set, overrides the cluster's HBM
    cfg = load_config(QUICKSTART, ["train.planner.cluster=h200-ib", "train.planner.hbm_gb=40"])
    make_plan(_module(cfg), cfg, 2, 2, "cuda")
    assert seen[-1].devices[0].storage.hbm == 40 * 10**9 and seen[-1].hbm_mem_bw == pytest.approx(4.8e9)


def test_a_table_too_big_for_an_a100s_hbm_is_offloaded_there_and_kept_in_hbm_on_an_h200():
    # item_id: 2.5e9 rows x dim 8, fp32 + row-wise adagrad = 90 GB on one GPU: more than 85% of 80 GB, less than
    # 85% of 141 GB
    plans = {}
    for cluster in ("a100-ib", "h200-ib"):
        cfg = load_config(QUICKSTART, ["schema.tables.item_id.rows=2500000000", f"train.planner.cluster={cluster}",
                                       "train.planner.ddr_gb=200"])
        plans[cluster] = make_plan(_module(cfg), cfg, 1, 1, "cuda").plan["model.sparse_arch.ec"]["item_id"]
    assert plans["a100-ib"].compute_kernel == "fused_uvm_caching"
    assert plans["h200-ib"].compute_kernel == "fused"
