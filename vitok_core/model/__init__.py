"""ViTok-v2 models (plain PyTorch modules)."""

from vitok_core.model.autoencoder import Autoencoder, build_autoencoder, count_parameters
from vitok_core.variants import SIZES, TowerSpec, VariantError, VariantSpec, parse_variant

__all__ = [
    "SIZES",
    "Autoencoder",
    "TowerSpec",
    "VariantError",
    "VariantSpec",
    "build_autoencoder",
    "count_parameters",
    "parse_variant",
]
