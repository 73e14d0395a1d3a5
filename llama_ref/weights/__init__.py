"""Readers of checkpoint formats. Each returns (ModelArgs, weights in Meta's layout, extras)."""

from .common import WeightsError

__all__ = ["WeightsError"]
