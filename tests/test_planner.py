"""launcher/planner.py and `python -m launcher.plan`: each component against a hand-computed case, the activation
model against measured CPU peak memory of the tiny configs, the CLI (suggestions, bad input)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from launcher.comm_model import LINKS, Link, Network, all_gather_s, all_reduce_s, p2p_s
from launcher.config import config_from_dict, load_config
from launcher.memory_probe import measure_activation_peak
from launcher.plan_memory import (activation_bytes, embedding_params, layer_params, model_states, stage_layers,
                                  stage_params, total_params)
from launcher.planner import (LayoutChoice, candidate_layouts, device_named, layer_gemms, plan_layout, suggest,
                              tp_all_reduces)
from launcher.throughput import flops_per_token
from model.family import build_model

# A model small enough to count by hand: h=8, f=32, 2 heads, 2 layers, vocabulary 16, 8 positions.
SMALL = {"model": {"num_layers": 2, "hidden_size": 8, "num_heads": 2, "ffn_hidden_size": 32,
                   "max_position_embeddings": 8, "vocab_size": 16, "dropout": 0.0},
         "attention": {"variant": "softmax1", "backend": "auto"},
         "data": {"seq_length": 4},
         "train": {"micro_batch_size": 2, "global_batch_size": 8, "precision": "fp32"}}


def small_cfg(**model: object):
    raw = {key: dict(value) for key, value in SMALL.items()}
    raw["model"].update(model)
    return config_from_dict(raw)


def test_parameter_counts_by_hand() -> None:
    m = small_cfg().model
    # q, k, v, out: 4 x (8*8 + 8) = 288; fc1 8*32 + 32 = 288; fc2 32*8 + 8 = 264; two LayerNorms 2*2*8 = 32
    assert layer_params(m) == 872
    # TP2: q/k/v 3*(64+8)/2 = 108, out 64/2 + 8 = 40, fc1 (256+32)/2 = 144, fc2 256/2 + 8 = 136, LNs 32
    assert layer_params(m, tp=2) == 460
    # embedding 16*8 = 128, positions (8+2)*8 = 80; final LayerNorm 16 + the tied head (128)
    assert embedding_params(m) == (208, 144)
    assert total_params(m) == 2 * 872 + 208 + 16
    assert stage_params(m, tp=1, pipeline=2, stage=0) == 872 + 208
    assert stage_params(m, tp=1, pipeline=2, stage=1) == 872 + 144  # DeepSpeed's tied copy on the last stage
    assert stage_layers(13, 4) == [4, 3, 3, 3]


@pytest.mark.parametrize("model", [
    {}, {"tie_word_embeddings": False}, {"family": "bert"},
    {"attention": {"variant": "learnable_sink", "gated": True, "gate_type": "mlp"}},
    {"family": "bert", "attention": {"variant": "softmax", "gated": True}},
])
def test_total_parameters_equal_the_models(model: dict) -> None:
    raw = {key: dict(value) for key, value in SMALL.items()}
    raw["attention"].update(model.pop("attention", {}))
    raw["model"].update(model)
    cfg = config_from_dict(raw)
    assert total_params(cfg.model) == build_model(cfg.model, seq_length=4).num_parameters()


def test_model_states_by_hand() -> None:
    P, N, L = 1000, 4, 100
    # ZeRO-0 fp32: weights 4P, gradients 4P, Adam moments 8P
    assert model_states(P, L, N, 0, "fp32") == {"parameters": 4000, "gradients": 4000, "optimizer": 8000}
    # ZeRO-0 bf16: 2P weights, 2P grads + 4P fp32 accumulators, 4P master + 8P moments
    assert model_states(P, L, N, 0, "bf16") == {"parameters": 2000, "gradients": 6000, "optimizer": 12000}
    # ZeRO-1 bf16: full 16-bit grads + the fp32 partition 4P/N; optimizer 12P/N
    assert model_states(P, L, N, 1, "bf16") == {"parameters": 2000, "gradients": 3000, "optimizer": 3000}
    # ZeRO-2 bf16 (DeepSpeed's estimator: 2P + 18P/N = 6500): grads (2 + 4)P/N
    assert model_states(P, L, N, 2, "bf16") == {"parameters": 2000, "gradients": 1500, "optimizer": 3000}
    # ZeRO-3 bf16 (DeepSpeed: 4L + 18P/N = 4900): weights 2P/N + 2L, optimizer 12P/N, grads the rest
    assert model_states(P, L, N, 3, "bf16") == {"parameters": 700, "gradients": 1200, "optimizer": 3000}
    # ZeRO-2 fp32: the fp32 partition's gradients are the reduced ones (no extra copy); master clone 4P/N
    assert model_states(P, L, N, 2, "fp32") == {"parameters": 4000, "gradients": 1000, "optimizer": 3000}


def test_activations_by_hand() -> None:
    m = small_cfg().model
    common = dict(micro_batch=2, seq=4, tp=1, pipeline=1, stage=0, in_flight=1, checkpointing=False, act_bytes=4,
                  device_kind="cpu")
    # x = 8 tokens: per layer 4xh + 5xh + xf = 256 + 320 + 256 = 832 elements = 3328 bytes, two layers;
    # head 3xh * 4 = 768, log-probabilities 4 * 8 * 16 = 512, backward (4 + 4) * 8 * 16 = 1024
    assert activation_bytes(m, **common) == 2 * 3328 + 768 + 512 + 1024
    eager = replace(m, attention=replace(m.attention, backend="eager"))
    assert activation_bytes(eager, **common) == 2 * 3328 + 2 * 3 * 2 * 16 * 2 * 4 + 768 + 512 + 1024
    dropout = replace(m, dropout=0.1)  # two masks of xh per layer, float noise (4 bytes) on CPU, bool on CUDA
    assert activation_bytes(dropout, **common) == 2 * 3328 + 2 * 2 * 64 * 4 + 2304
    assert activation_bytes(dropout, **{**common, "device_kind": "cuda"}) == 2 * 3328 + 2 * 2 * 64 * 1 + 2304
    # pipeline of 2: stage 0 holds 2 micro-batches of its one layer; with recomputation only their inputs
    # (xh each) plus one layer recomputed
    piped = {**common, "pipeline": 2, "in_flight": 2}
    assert activation_bytes(m, **piped) == 2 * 3328
    assert activation_bytes(m, **{**piped, "checkpointing": True}) == 2 * 8 * 8 * 4 + 3328


def test_plan_totals_flops_and_step_time() -> None:
    cfg = small_cfg()
    h100 = device_named("H100")
    layout = LayoutChoice(tensor=1, pipeline=2, data=2, zero_stage=1, micro_batch_size=2)
    plan = plan_layout(cfg, layout, h100, mfu=0.5)
    assert plan.precision == "fp32" and plan.stage == 0 and plan.in_flight == 2  # accumulation 8 / (2*2) = 2
    assert plan.bytes["parameters"] == 4 * (872 + 208)
    assert plan.flops_per_step == flops_per_token(cfg.model, 4) * 8 * 4
    compute = plan.flops_per_step / (4 * 989e12 * 0.5)
    assert math.isclose(plan.time["compute"], compute)
    # 2 micro-batches per rank: one activation and one gradient send each (2 x 8 tokens x 8 hidden x 4 bytes
    # over NVLink 4 at 80% of 450 GB/s, 5 us per message); the bubble is one slot (compute / 2 + its sends)
    send = 5e-6 + 2 * 4 * 8 * 4 / (450e9 * 0.8)
    assert math.isclose(plan.time["pipeline_p2p"], 2 * 2 * send)
    assert math.isclose(plan.time["bubble"], compute / 2 + 2 * send)
    # DP2 all-reduce of the stage's 1080 fp32 gradients: 2 latency steps + 2 (n-1)/n x 4320 bytes / bandwidth
    assert math.isclose(plan.time["data_parallel"], 2 * 5e-6 + 4 * (872 + 208) / (450e9 * 0.8))
    assert plan.step_time_s == sum(plan.time.values())
    assert plan.total == sum(plan.bytes.values())


def test_collective_costs_by_hand() -> None:
    link = Link("test", bandwidth_gbs=1.0, latency_s=1e-3, source="by hand", efficiency=0.5)  # 0.5e9 B/s
    assert math.isclose(all_reduce_s(1e9, 4, link), 6e-3 + 1.5 * 2.0)  # 2(n-1) steps, 2(n-1)/n x S / B
    assert math.isclose(all_gather_s(1e9, 4, link), 3e-3 + 0.75 * 2.0)
    assert math.isclose(p2p_s(1e9, link), 1e-3 + 2.0)
    assert all_reduce_s(1e9, 1, link) == 0.0
    network = Network(intra=LINKS["nvlink4"], inter=LINKS["ib_ndr"], gpus_per_node=8)
    assert network.link(8) is LINKS["nvlink4"] and network.link(16) is LINKS["ib_ndr"]


def test_tensor_parallel_time_counts_what_the_code_issues() -> None:
    cfg = small_cfg()  # 2 layers, h 8, f 32; micro-batch 2 x 4 tokens; TP2 x DP1: 4 micro-batches per step
    cpu_link = Link("gloo", bandwidth_gbs=1.0, latency_s=1e-3, source="by hand", efficiency=1.0,
                    overlaps_compute=False)
    h100 = replace(device_named("H100"), layer_issue_s=1e-3)
    tp2 = LayoutChoice(tensor=2, data=1, micro_batch_size=2)
    plan = plan_layout(cfg, tp2, h100, mfu=0.5, network=Network(cpu_link, cpu_link))
    # per layer: out_proj and fc2 forward, q, k, v and fc1 input gradients; + embedding, head; cross entropy's 3
    assert tp_all_reduces(2, "none") == (5, 9, 3) and tp_all_reduces(2, "full") == (9, 9, 3)
    one, small = all_reduce_s(8 * 8 * 4, 2, cpu_link), all_reduce_s(4 * 8, 2, cpu_link)
    assert math.isclose(plan.time["tensor_parallel"], 4 * (14 * one + 3 * small))
    assert math.isclose(plan.time["host"], 4 * 2 * 1e-3)  # every micro-batch's every layer, on each TP rank
    # a link beside the compute hides each backward input-gradient all-reduce behind its weight-gradient GEMM:
    # all of it when the GEMM is slow enough (a tiny peak), nothing of the head's
    nccl = replace(cpu_link, overlaps_compute=True)
    slow = plan_layout(cfg, tp2, replace(h100, peak_tflops=1e-9), mfu=0.5, network=Network(nccl, nccl))
    assert math.isclose(slow.time["tensor_parallel"], 4 * (6 * one + 3 * small))
    # shards measured at half the full shapes' rate take twice the compute; shapes not all measured: no change
    rates = {**{shape: 1e9 for shape in layer_gemms(cfg.model, 8, 1)},
             **{shape: 0.5e9 for shape in layer_gemms(cfg.model, 8, 2)}}
    measured = plan_layout(cfg, tp2, replace(h100, gemm_rates=tuple(rates.items())), mfu=0.5)
    assert math.isclose(measured.time["compute"], 2 * plan.time["compute"])
    partial = plan_layout(cfg, tp2, replace(h100, gemm_rates=tuple(list(rates.items())[:3])), mfu=0.5)
    assert math.isclose(partial.time["compute"], plan.time["compute"])


def test_layouts_that_communicate_differently_rank_differently() -> None:
    cfg = load_config("configs/opt_1b3.yaml")
    h100 = device_named("H100")
    times = {(t, p, d, z, ac): plan_layout(cfg, LayoutChoice(t, p, d, z, 8, ac), h100) for t, p, d, z, ac in [
        (1, 1, 8, 0, "none"), (1, 1, 8, 2, "none"), (2, 1, 4, 0, "none"), (1, 2, 4, 0, "none"),
        (1, 1, 8, 0, "full"), (1, 1, 8, 0, "selective")]}
    steps = {key: plan.step_time_s for key, plan in times.items()}
    assert len(set(steps.values())) == len(steps)  # no two alike (before this, all were 3.006 s)
    base = times[(1, 1, 8, 0, "none")]
    assert times[(2, 1, 4, 0, "none")].time["tensor_parallel"] > 0 and times[(1, 2, 4, 0, "none")].time["bubble"] > 0
    assert steps[(1, 1, 8, 2, "none")] > steps[(1, 1, 8, 0, "none")]  # ZeRO-2 reduce-scatters every micro-batch
    assert steps[(1, 1, 8, 0, "full")] > steps[(1, 1, 8, 0, "selective")] > base.step_time_s
    # the same DP16 all-reduce over InfiniBand (two nodes) costs more than DP8 over NVLink (one node)
    sixteen = plan_layout(cfg, LayoutChoice(1, 1, 16, 0, 8), h100)
    assert sixteen.time["data_parallel"] > base.time["data_parallel"]
    ranked = suggest(cfg, 8, h100)
    assert [p.step_time_s for p in ranked] == sorted(p.step_time_s for p in ranked)


@pytest.mark.parametrize("config,overrides", [
    ("configs/opt_tiny.yaml", []),
    ("configs/opt_tiny.yaml", ["attention.backend=eager", "model.dropout=0.1", "model.vocab_size=512",
                               "data.vocab_size=512"]),
    ("configs/bert_tiny.yaml", []),
    ("configs/bert_tiny.yaml", ["attention.variant=learnable_sink", "attention.gated=true", "model.vocab_size=512",
                                "data.vocab_size=512"]),
])
def test_activation_model_matches_measured_cpu_peak(config: str, overrides: list[str]) -> None:
    # micro-batch 4 keeps the per-op tracking quick; the model is linear in it
    cfg = load_config(config, overrides + ["train.precision=fp32", "train.micro_batch_size=4",
                                           "train.global_batch_size=4"])
    planned = plan_layout(cfg, LayoutChoice(micro_batch_size=cfg.train.micro_batch_size),
                          device_named("cpu")).bytes["activations"]
    measured = measure_activation_peak(cfg)
    assert abs(planned / measured - 1) <= 0.25, (planned, measured)


def test_suggestions_fit_and_respect_the_project_rules() -> None:
    cfg = load_config("configs/opt_1b3.yaml")
    a10g = device_named("A10G")
    options = suggest(cfg, 16, a10g)
    assert options and all(p.fits for p in options)
    for layout in candidate_layouts(cfg, 16):
        assert layout.tensor * layout.pipeline * layout.data == 16
        assert layout.pipeline == 1 or layout.zero_stage <= 1
        assert cfg.train.global_batch_size % (layout.micro_batch_size * layout.data) == 0
    # the configured layout (ZeRO-2, DP16, micro-batch 8) does not fit 24 GiB: activations alone exceed it
    configured = plan_layout(cfg, LayoutChoice(1, 1, 16, 2, 8), a10g)
    assert not configured.fits


def test_cli_prints_plan_and_suggestions(capsys: pytest.CaptureFixture[str]) -> None:
    from launcher import plan

    assert plan.main(["--config", "configs/opt_125m.yaml", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 24" in out and "layouts that fit on 8 x H100-80GB" in out
    assert out.strip().splitlines()[-1].startswith("plan: ")
    assert plan.main(["--config", "configs/opt_125m.yaml", "--gpus", "8", "--set", "parallel.zero_stage=2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # nothing else on stdout
    assert result["plan"]["layout"]["zero_stage"] == 2 and result["suggestions"]
    assert plan.main(["--config", "configs/opt_tiny.yaml", "--gpu", "TPUv9"]) == 2
    assert capsys.readouterr().err.strip() == ("error: config key '--gpu' = 'TPUv9': unknown device (one of H100, "
                                               "H200, A100-80GB, A100-40GB, L40S, A10G, V100, cpu)")
    assert plan.main(["--config", "configs/opt_tiny.yaml", "--gpus", "3", "--set", "parallel.tensor=2"]) == 2
    assert capsys.readouterr().err.startswith("error: config key 'parallel.tensor'")


def test_planner_check_fits_latency_and_bandwidth_robustly() -> None:
    from benchmarks.planner_check import fit_link

    # t(S) = 2 a + S / B with a = 50 us, B = 1 GB/s; the largest size is an outlier (a busy machine)
    times = {str(s): 100e-6 + s / 1e9 for s in (2**10, 2**14, 2**18, 2**20, 2**22)}
    times[str(2**22)] *= 5
    latency, bandwidth = fit_link(times)
    assert latency == pytest.approx(50e-6, rel=0.03) and bandwidth == pytest.approx(1e9, rel=0.01)
