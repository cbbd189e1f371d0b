"""STanHop-Net (Wu et al., ICLR 2024) as a model family: importing the package registers its spec."""

from model.family import register_family
from model.stanhop.config import StanhopAttentionConfig, StanhopConfig
from model.stanhop.data import StanhopDataConfig
from model.stanhop.spec import StanhopSpec

SPEC = register_family(StanhopSpec())

__all__ = ["SPEC", "StanhopAttentionConfig", "StanhopConfig", "StanhopDataConfig", "StanhopSpec"]
