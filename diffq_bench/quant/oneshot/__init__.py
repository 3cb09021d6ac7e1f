"""One-shot weight-coupled mixed precision (Tang et al., CVPR 2024): the supernet quantizer
(:mod:`.quantizer`), its BatchNorm pairs (:mod:`.bnpairs`), distillation (:mod:`.distill`),
bit-width scheduler (:mod:`.schedule`), budgeted search (:mod:`.search`) and export (:mod:`.export`).
"""
from .quantizer import COSTS, OneShotMPQQuantizer

__all__ = ["COSTS", "OneShotMPQQuantizer"]
