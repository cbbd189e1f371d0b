"""The BERT family: model (model.py), pipeline stages (pipeline.py), Hugging Face adapter (hf.py), spec (spec.py)."""

from model.bert.model import (BertEmbeddings, BertForMaskedLM, BertLayer, BertModel,
                              BertPredictionHeadTransform)
from model.bert.spec import BertSpec
from model.family import register_family

SPEC = register_family(BertSpec())

__all__ = ["SPEC", "BertEmbeddings", "BertForMaskedLM", "BertLayer", "BertModel", "BertPredictionHeadTransform",
           "BertSpec"]
