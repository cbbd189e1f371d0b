"""ViT under tensor, pipeline and data parallelism (parallel/engine.py, the path of launcher.pretrain): the
per-step losses and gradient norms of TP2, PP2 and DP2 equal one process, and TP2 with train.compile equals eager TP2.

The tests launch this same file under `torch.distributed.run` (see `main`), as tests/test_parallel.py does
with tests/parallel_worker.py for OPT and BERT: every layout in LAYOUTS trains two tiny ViTs (softmax1, and
the learnable sink with the head gate) for STEPS steps with binding clipping, gradient accumulation and a
warmup + cosine schedule, and rank 0 writes the losses and logged gradient norms as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RUNS = {"vit/softmax1": dict(variant="softmax1"), "vit/learnable_sink_gated": dict(variant="learnable_sink", gated=True)}
STEPS, MICRO, GLOBAL, CLASSES = 8, 2, 8, 4
CLIP = 0.2
SINGLE = (1, 1, 0)
LAYOUTS = {"TP2": (2, 1, 0), "PP2": (1, 2, 0), "DP2": (1, 1, 0), "TP2-ZeRO1": (2, 1, 1)}
COMPILED_TP2 = (2, 1, 0, "compile")  # train.compile's blocks under TP2, vit/softmax1 only (compiling is slow)


def tiny_vit(attention: dict) -> object:
    from model.config import AttentionConfig
    from model.vit.config import ViTConfig

    return ViTConfig(image_size=8, patch_size=4, num_classes=CLASSES, num_layers=2, hidden_size=32, num_heads=4,
                     ffn_hidden_size=64, init_std=0.05, label_smoothing=0.1, attention=AttentionConfig(**attention))


def examples() -> list[tuple[torch.Tensor, int]]:
    """Learnable images: a class's fixed random pattern plus noise."""
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randn(CLASSES, 3, 8, 8, generator=generator)
    labels = torch.randint(0, CLASSES, (STEPS * GLOBAL,), generator=generator)
    return [(patterns[c] + 0.5 * torch.randn(3, 8, 8, generator=generator), int(c)) for c in labels]


def train_layout(tp: int, pp: int, zero: int, device: torch.device,
                 compile: bool = False) -> dict[str, dict[str, list[float]]]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from launcher.schedule import build_scheduler
    from model.family import spec_for
    from parallel.engine import build_parallel_model, train_step
    from parallel.layout import validate_layout

    spec, data, results = spec_for("vit"), examples(), {}
    for name, attention in RUNS.items():
        if compile and name != "vit/softmax1":
            continue
        cfg = tiny_vit(attention)
        layout = validate_layout(cfg, tensor=tp, pipeline=pp, zero_stage=zero, world_size=dist.get_world_size(),
                                 micro_batch_size=MICRO, global_batch_size=GLOBAL)
        accumulation = GLOBAL // (MICRO * layout.data)
        ds_config = {"train_batch_size": GLOBAL, "train_micro_batch_size_per_gpu": MICRO,
                     "gradient_accumulation_steps": accumulation, "gradient_clipping": CLIP,
                     "zero_optimization": {"stage": zero}, "steps_per_print": 10**9}
        pm = build_parallel_model(
            cfg, layout, seq_length=cfg.seq_length, seed=7, ds_config=ds_config,
            make_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
            make_scheduler=lambda o: build_scheduler(o, lr=1e-2, min_lr=1e-3, warmup_steps=3, total_steps=STEPS,
                                                     schedule="cosine"),
            compile=compile)
        mine = data[ps.get_data_parallel_rank()::layout.data]  # example i to rank i % dp, as the image stream
        stream = (spec.collate(mine[start:start + MICRO]) for start in range(0, len(mine), MICRO))
        steps = [train_step(pm, stream, accumulation, device) for _ in range(STEPS)]
        results[name] = {"loss": [loss for loss, _ in steps],
                         "grad_norm": [float("nan") if norm is None else norm for _, norm in steps]}
    return results


def main() -> None:
    import deepspeed.utils.groups as ds_groups
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    from launcher.distributed import init_process_group
    from parallel.groups import destroy_model_parallel

    device = init_process_group()
    results = {}
    for layout in os.environ["LAYOUTS"].split(";"):
        tp, pp, zero, *extra = layout.split(",")
        results[layout] = train_layout(int(tp), int(pp), int(zero), device, compile=extra == ["compile"])
        destroy_model_parallel()  # the next layout builds its own groups
        ds_groups.mpu = None
        dist.barrier()
    if dist.get_rank() == 0:
        Path(os.environ["OUT"]).write_text(json.dumps(results))
    dist.barrier()


def _launch(tmp_path: Path, ranks: int, layouts: list[tuple[int | str, ...]]) -> dict[str, dict]:
    from conftest import free_port

    out = tmp_path / f"vit_layouts_{ranks}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(LAYOUTS=";".join(",".join(map(str, spec)) for spec in layouts), OUT=str(out), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_port", str(free_port()), str(Path(__file__).resolve())]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("vit_layouts")
    single = _launch(tmp, 1, [SINGLE])
    return {**single, **_launch(tmp, 2, [*LAYOUTS.values(), COMPILED_TP2])}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_vit_layout_matches_single_process(trained: dict[str, dict], layout: str) -> None:
    """Loss within 1e-5 and logged gradient norm within 1e-4 (relative) of one process, at every step."""
    expected_runs = trained[",".join(map(str, SINGLE))]
    got_runs = trained[",".join(map(str, LAYOUTS[layout]))]
    for run, expected in expected_runs.items():
        got = got_runs[run]
        assert len(got["loss"]) == len(expected["loss"]) == STEPS
        assert min(expected["grad_norm"]) > 2 * CLIP, run  # clipping binds at every step
        assert expected["loss"][-1] < expected["loss"][0] - 0.3, run  # the patterns are learned
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5), f"{run}: loss"
        assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4), f"{run}: grad norm"


@pytest.mark.slow
def test_vit_compiled_tensor_parallel_equals_eager(trained: dict[str, dict]) -> None:
    """train.compile under TP2 (megatron-core's layers and collectives between compiled blocks): the losses of
    the eager TP2 run within 1e-5."""
    expected = trained[",".join(map(str, LAYOUTS["TP2"]))]["vit/softmax1"]["loss"]
    got = trained[",".join(map(str, COMPILED_TP2))]["vit/softmax1"]["loss"]
    assert got == pytest.approx(expected, rel=0, abs=1e-5)


if __name__ == "__main__":
    main()
