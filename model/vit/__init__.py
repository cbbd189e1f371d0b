"""The ViT family: model (model.py), its config (config.py), image data (data.py, data_config.py), pipeline
stages (pipeline.py), timm and Hugging Face adapters (timm_names.py, hf.py), spec (spec.py)."""

from model.family import register_family
from model.vit.spec import ViTSpec

SPEC = register_family(ViTSpec())

__all__ = ["SPEC", "ViTSpec"]
