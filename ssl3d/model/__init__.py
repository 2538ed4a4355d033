"""Encoder and SSL heads."""

from ssl3d.model.encoder import LegacyPatchMerging, build_encoder
from ssl3d.model.ssl_model import ReorderedSequential, SSLModel, SSLOutput, build_decoder, build_model, execution_order

__all__ = [
    "LegacyPatchMerging",
    "ReorderedSequential",
    "SSLModel",
    "SSLOutput",
    "build_decoder",
    "build_encoder",
    "build_model",
    "execution_order",
]
