"""ViT export (model/vit/hf.py): transformers (every variant, remote code) and timm (softmax) load the folder
and compute the project's logits, in a child interpreter that cannot import this project."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import without_project_prelude

from model.config import AttentionConfig
from model.vit.config import ViTConfig
from model.vit.data_config import ImageDataConfig
from model.vit.hf import ViTAdapter, export_folder
from model.vit.model import VisionTransformer

CASES = [("softmax", False), ("softmax1", False), ("clipped_softmax", False), ("clipped_softmax1", False),
         ("learnable_sink", False), ("softmax1", True)]


def perturbed_model(variant: str, gated: bool) -> tuple[SimpleNamespace, VisionTransformer]:
    """A tiny ViT whose every parameter (sink logits, gate, biases) is away from its initial value."""
    attention = AttentionConfig(variant=variant, backend="eager", gated=gated, alpha=4.0 if "clipped" in variant else None)
    cfg = ViTConfig(image_size=16, patch_size=4, num_classes=7, num_layers=2, hidden_size=32, num_heads=4,
                    ffn_hidden_size=64, attention=attention)
    torch.manual_seed(0)
    model = VisionTransformer(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return SimpleNamespace(model=cfg, data=ImageDataConfig()), model


def test_hf_names_round_trip() -> None:
    run, model = perturbed_model("learnable_sink", True)
    state = model.state_dict()
    adapter = ViTAdapter()
    back = adapter.from_hf(adapter.to_hf(state, run.model), run.model)
    assert set(back) == set(state) and all(torch.equal(back[k], v) for k, v in state.items())


@pytest.mark.slow
def test_export_loads_and_matches_without_the_project(tmp_path: Path) -> None:
    pixels = torch.randn(3, 3, 16, 16)
    torch.save(pixels, tmp_path / "pixels.pt")
    expected = {}
    for variant, gated in CASES:
        run, model = perturbed_model(variant, gated)
        name = f"{variant}{'_gated' if gated else ''}"
        export_folder(run, model.state_dict(), tmp_path / name)
        with torch.no_grad():
            expected[name] = model(pixels)
    assert (tmp_path / "softmax" / "timm").is_dir() and not (tmp_path / "softmax1" / "timm").exists()
    script = without_project_prelude() + f"""
import torch, timm
from transformers import AutoModelForImageClassification
root = {str(tmp_path)!r}
pixels = torch.load(root + "/pixels.pt")
out = {{}}
with torch.no_grad():
    for name in {[f"{v}{'_gated' if g else ''}" for v, g in CASES]!r}:
        model = AutoModelForImageClassification.from_pretrained(root + "/" + name, trust_remote_code=True).eval()
        out[name] = model(pixel_values=pixels).logits.tolist()
    out["timm"] = timm.create_model("local-dir:" + root + "/softmax/timm", pretrained=True).eval()(pixels).tolist()
    try:  # the stock class must refuse a variant's folder rather than compute plain softmax
        from transformers import ViTForImageClassification
        ViTForImageClassification.from_pretrained(root + "/softmax1")(pixel_values=pixels)
        out["stock_refused"] = False
    except Exception:
        out["stock_refused"] = True
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for name, logits in expected.items():
        assert torch.allclose(torch.tensor(got[name]), logits, atol=1e-5), name
    assert torch.allclose(torch.tensor(got["timm"]), expected["softmax"], atol=1e-5)
    assert got["stock_refused"]
