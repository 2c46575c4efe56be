"""flipctr: CTR prediction with ID-based models aligned to pretrained language models (FLIP)."""

__version__ = "0.1.0"
