"""a2v_flower: federated audio-to-image adapters (AST audio -> CLIP/T5 conditioning) on Flower."""

__version__ = "0.1.0"
