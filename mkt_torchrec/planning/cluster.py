"""Cluster presets: the memory and bandwidth figures TorchRec's planner sizes and costs a plan with.

Without a cluster the planner uses TorchRec 1.8's built-in bandwidths (``torchrec/distributed/planner/constants.py``:
``INTRA_NODE_BANDWIDTH = 600 * 1024**3 / 1000``, ``CROSS_NODE_BANDWIDTH = 12.5 * 1024**3 / 1000``,
``HBM_MEM_BW = 897 * 1024**3 / 1000``, ``HBM_TO_DDR_MEM_BW = 32 * 1024**3 / 1000``, each commented ``# bytes/ms``).
A cluster replaces them with a GPU node's datasheet figures. A spec is

* a preset name: ``a100-ib``, ``h100-ib``, ``h200-ib`` (:data:`PRESETS`);
* a preset with figures overridden: ``h100-ib:inter=25GB/s`` (H100 nodes on 200 Gb/s HDR InfiniBand);
* ``custom:hbm=80GB,hbm_bw=3.35TB/s,intra=450GB/s,inter=50GB/s[,pcie=64GB/s]`` (``pcie`` defaults to TorchRec's).

Keys: ``hbm`` HBM per GPU (``GB`` = 10^9 bytes, as vendors publish it; ``TB``, ``GiB`` also read), ``hbm_bw`` HBM
bandwidth, ``intra`` NVLink, ``inter`` network (InfiniBand), ``pcie`` host <-> GPU (what UVM-offloaded tables are
costed with). Bandwidths take ``GB/s``, ``TB/s``, ``GiB/s`` or bits, ``Gb/s``; every one is per GPU and per
direction. That is the convention of TorchRec's cost model: it divides the bytes one rank sends by the figure
(``estimator.py``: ``output_size / comms_bw``), and its ``BasicCommsBandwidths.get_bw`` multiplies ``inter_host_bw``
by ``local_world_size`` for an all-reduce (``# 1 NIC per GPU``). (TorchRec's own 600 GB/s intra-node default is the
A100's NVLink total over both directions; its 12.5 GB/s cross-node default is one 100 Gb/s NIC one way.)

Host memory (DDR) capacity is not part of a cluster: it is what the job is given (``train.planner.ddr_gb``,
``--ddr-gb``), not what the node has. DDR bandwidth neither: TorchRec costs only CPU kernels with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Dict, Optional

GB = 1e9  # vendors' gigabyte (bytes)
BYTES_PER_MS = GB / 1000  # 1 GB/s in TorchRec's unit, bytes per millisecond

# size units -> bytes; bandwidth units -> bytes per second
_SIZE_UNITS = {"GB": GB, "TB": 1e12, "GiB": float(1 << 30), "TiB": float(1 << 40)}
_RATE_UNITS = {"GB/s": GB, "TB/s": 1e12, "GiB/s": float(1 << 30), "Gb/s": GB / 8, "Tb/s": 1e12 / 8}
_KEYS = {"hbm": "hbm_gb", "hbm_bw": "hbm_bw", "intra": "intra", "inter": "inter", "pcie": "pcie"}
_REQUIRED = ("hbm", "hbm_bw", "intra", "inter")  # of a custom spec


@dataclass(frozen=True)
class Cluster:
    """One GPU per rank of a cluster: HBM capacity (GB, 10^9 bytes) and bandwidths (GB/s per GPU and direction).

    Args:
        name: the spec it was read from (``h100-ib``, ``h100-ib:inter=25GB/s``, ``custom:...``).
        hbm_gb: HBM per GPU.
        hbm_bw: HBM bandwidth (TorchRec's ``hbm_mem_bw``).
        intra: NVLink within a node (``intra_host_bw``).
        inter: network between nodes, the GPU's own NIC (``inter_host_bw``).
        pcie: host memory <-> GPU (``hbm_to_ddr_mem_bw``); None: TorchRec's default.
    """

    name: str
    hbm_gb: float
    hbm_bw: float
    intra: float
    inter: float
    pcie: Optional[float] = None

    def topology_bandwidths(self) -> Dict[str, float]:
        """TorchRec ``HardwareConfig`` / ``Topology`` bandwidth fields, in bytes per millisecond."""
        out = {"hbm_mem_bw": self.hbm_bw * BYTES_PER_MS, "intra_host_bw": self.intra * BYTES_PER_MS,
               "inter_host_bw": self.inter * BYTES_PER_MS}
        if self.pcie is not None:
            out["hbm_to_ddr_mem_bw"] = self.pcie * BYTES_PER_MS
        return out

    def describe(self) -> str:
        pcie = f", PCIe {self.pcie:g}" if self.pcie is not None else ""
        return (f"cluster {self.name}: {self.hbm_gb:g} GB HBM at {self.hbm_bw:g} GB/s, NVLink {self.intra:g}, "
                f"network {self.inter:g}{pcie} GB/s per GPU and direction")


# Datasheet figures, per GPU. NVIDIA quotes NVLink and PCIe summed over both directions: halved here.
PRESETS: Dict[str, Cluster] = {
    # DGX A100 / HGX A100 80GB. NVIDIA A100 datasheet (A100 80GB SXM): HBM2e 80 GB, 2,039 GB/s;
    # NVLink 600 GB/s (both directions: 300 each); PCIe Gen4 64 GB/s (32 each).
    # DGX A100 user guide: 8 single-port ConnectX-6 HDR InfiniBand 200 Gb/s, one per GPU = 25 GB/s.
    "a100-ib": Cluster("a100-ib", hbm_gb=80, hbm_bw=2039, intra=300, inter=25, pcie=32),
    # DGX H100 / HGX H100. NVIDIA H100 datasheet (H100 SXM): HBM3 80 GB, 3.35 TB/s; NVLink 900 GB/s (450 each);
    # PCIe Gen5 128 GB/s (64 each). DGX H100 user guide: 8 ConnectX-7 NDR InfiniBand 400 Gb/s, one per GPU = 50 GB/s.
    "h100-ib": Cluster("h100-ib", hbm_gb=80, hbm_bw=3350, intra=450, inter=50, pcie=64),
    # DGX H200 / HGX H200. NVIDIA H200 datasheet (H200 SXM): HBM3e 141 GB, 4.8 TB/s; NVLink 900 GB/s (450 each);
    # PCIe Gen5 128 GB/s (64 each). DGX H200: 8 ConnectX-7 NDR InfiniBand 400 Gb/s, one per GPU = 50 GB/s.
    "h200-ib": Cluster("h200-ib", hbm_gb=141, hbm_bw=4800, intra=450, inter=50, pcie=64),
}


def _quantity(key: str, text: str) -> float:
    """``80GB`` -> 80.0 (GB); ``3.35TB/s`` -> 3350.0 (GB/s); ValueError naming ``key=text`` otherwise."""
    units = _SIZE_UNITS if key == "hbm" else _RATE_UNITS
    example = "80GB or 141GB" if key == "hbm" else "50GB/s, 400Gb/s or 3.35TB/s"
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z/]*)\s*", text)
    if not m or m.group(2) not in units:
        raise ValueError(f"{key}={text!r}: expected a number and one of the units {', '.join(units)}, "
                         f"e.g. {example}")
    value = float(m.group(1)) * units[m.group(2)] / GB
    if not value > 0:
        raise ValueError(f"{key}={text!r}: must be positive")
    return value


def parse_cluster(spec: str) -> Cluster:
    """A cluster spec (see the module docstring) -> :class:`Cluster`.

    Raises:
        ValueError: one line naming the bad part: an unknown preset, a part that is not ``key=value``, an unknown
            or repeated key, a value without a known unit, or a custom spec missing a required key.
    """
    text = spec.strip()
    base_name, sep, rest = text.partition(":")
    base_name = base_name.strip()
    if base_name != "custom" and base_name not in PRESETS:
        raise ValueError(f"{base_name!r} is not a cluster preset; expected one of {', '.join(PRESETS)}, "
                         f"PRESET:key=value,... or custom:hbm=..,hbm_bw=..,intra=..,inter=..")
    values: Dict[str, float] = {}
    for part in (rest.split(",") if sep else []):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in _KEYS:
            raise ValueError(f"{part.strip()!r}: expected key=value with key one of {', '.join(_KEYS)}")
        if key in values:
            raise ValueError(f"{part.strip()!r}: {key} is given twice")
        values[key] = _quantity(key, value)
    if base_name == "custom":
        missing = [k for k in _REQUIRED if k not in values]
        if missing:
            raise ValueError(f"custom cluster: missing {', '.join(missing)} (needs {', '.join(_REQUIRED)}; "
                             f"pcie is optional)")
        base = Cluster(text, *(values[k] for k in _REQUIRED))
    else:
        base = replace(PRESETS[base_name], name=text)
    return replace(base, **{_KEYS[k]: v for k, v in values.items()})
