"""Shared building blocks the model files are made of."""
