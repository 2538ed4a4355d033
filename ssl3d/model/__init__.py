"""Encoder and SSL heads."""

from ssl3d.model.encoder import LegacyPatchMerging, build_encoder
from ssl3d.model.ssl_model import SSLModel, SSLOutput, build_decoder, build_model

__all__ = ["LegacyPatchMerging", "SSLModel", "SSLOutput", "build_decoder", "build_encoder", "build_model"]
