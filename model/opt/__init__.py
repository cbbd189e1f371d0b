"""The OPT family: model (model.py), pipeline stages (pipeline.py), Hugging Face adapter (hf.py), spec (spec.py)."""

from model.family import register_family
from model.opt.model import LearnedPositions, OPTDecoder, OPTDecoderLayer, OPTForCausalLM
from model.opt.spec import OPTSpec

SPEC = register_family(OPTSpec())

__all__ = ["SPEC", "LearnedPositions", "OPTDecoder", "OPTDecoderLayer", "OPTForCausalLM", "OPTSpec"]
