"""The communication part of launcher/planner.py's step time: links, ring collectives and which link a group uses.

Collectives are costed as NCCL's (and gloo's) ring algorithms (Thakur et al. 2005; NCCL's nccl-tests
"busbw" definition): over n ranks, with per-step latency a and the link's per-rank bandwidth B x efficiency,
  all-reduce of S bytes:                 2 (n - 1) a + 2 (n - 1) / n x S / B
  all-gather / reduce-scatter of S bytes:  (n - 1) a +   (n - 1) / n x S / B   (S = the gathered total)
  point-to-point of S bytes:                     a +                 S / B
A group uses the slowest link it crosses: ranks are ordered TP fastest, then DP, then PP (megatron-core's and
DeepSpeed's PipeModelDataParallelTopology order), so a group spanning more than one node's GPUs crosses
InfiniBand, otherwise NVLink (or PCIe).
"""

from __future__ import annotations

from dataclasses import dataclass

# Fraction of a link's datasheet bandwidth a large ring collective reaches (nccl-tests bus bandwidth on
# DGX-class machines is ~75-85% of the NVLink/IB line rate); measured links (gloo) use 1.0.
DATASHEET_EFFICIENCY = 0.8


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth_gbs: float  # per rank, one direction, GB/s (1e9 bytes)
    latency_s: float  # per ring step
    source: str
    efficiency: float = DATASHEET_EFFICIENCY
    # Whether a collective runs beside the rank's compute (NCCL: its own SMs and copy engines) rather than on the
    # cores that compute (gloo on a CPU: its transport thread and the kernel's TCP stack), so that an async
    # collective can hide behind a GEMM.
    overlaps_compute: bool = True

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_gbs * 1e9 * self.efficiency


# Per-GPU, one-direction bandwidth (half the datasheets' bidirectional figures); latencies are nccl-tests'
# small-message order of magnitude per ring step.
LINKS = {
    "nvlink4": Link("NVLink 4", 450.0, 5e-6, "NVIDIA H100/H200 SXM datasheet: 900 GB/s bidirectional per GPU"),
    "nvlink3": Link("NVLink 3", 300.0, 5e-6, "NVIDIA A100 SXM datasheet: 600 GB/s bidirectional per GPU"),
    "nvlink2": Link("NVLink 2", 150.0, 5e-6, "NVIDIA V100 SXM2 datasheet: 300 GB/s bidirectional per GPU"),
    "pcie4": Link("PCIe 4.0 x16", 32.0, 10e-6, "PCI-SIG 4.0: 16 GT/s x 16 lanes = 64 GB/s bidirectional"),
    "ib_ndr": Link("InfiniBand NDR", 50.0, 10e-6, "NVIDIA ConnectX-7 400 Gb/s, one per GPU (DGX H100)"),
    "ib_hdr": Link("InfiniBand HDR", 25.0, 10e-6, "NVIDIA ConnectX-6 200 Gb/s, one per GPU (DGX A100)"),
}
# (within a node, between nodes) of each GPU in launcher/planner.py's table (its SXM/DGX form where there is one)
DEFAULT_LINKS = {"H100": ("nvlink4", "ib_ndr"), "H200": ("nvlink4", "ib_ndr"), "A100-80GB": ("nvlink3", "ib_hdr"),
                 "A100-40GB": ("nvlink3", "ib_hdr"), "V100": ("nvlink2", "ib_hdr"), "L40S": ("pcie4", "ib_hdr"),
                 "A10G": ("pcie4", "ib_hdr")}


@dataclass(frozen=True)
class Network:
    intra: Link  # within a node
    inter: Link  # between nodes
    gpus_per_node: int = 8

    def link(self, span: int) -> Link:
        """The link of a group whose ranks lie within `span` consecutive global ranks."""
        return self.intra if span <= self.gpus_per_node else self.inter

    def describe(self) -> str:
        return (f"{self.intra.name} {self.intra.bandwidth_gbs:g} GB/s within a node of {self.gpus_per_node}, "
                f"{self.inter.name} {self.inter.bandwidth_gbs:g} GB/s between nodes")


def network_for(gpu_key: str, gpus_per_node: int = 8) -> Network:
    intra, inter = DEFAULT_LINKS.get(gpu_key, ("nvlink4", "ib_ndr"))
    return Network(LINKS[intra], LINKS[inter], gpus_per_node)


def all_reduce_s(size: float, ranks: int, link: Link) -> float:
    if ranks <= 1 or size <= 0:
        return 0.0
    return 2 * (ranks - 1) * link.latency_s + 2 * (ranks - 1) / ranks * size / link.bytes_per_s


def all_gather_s(size: float, ranks: int, link: Link) -> float:
    """All-gather (or reduce-scatter) of `size` bytes in total."""
    if ranks <= 1 or size <= 0:
        return 0.0
    return (ranks - 1) * link.latency_s + (ranks - 1) / ranks * size / link.bytes_per_s


def p2p_s(size: float, link: Link) -> float:
    return link.latency_s + size / link.bytes_per_s
