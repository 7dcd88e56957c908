"""Artifacts that leave the run: merged models and combined adapters, verified."""
