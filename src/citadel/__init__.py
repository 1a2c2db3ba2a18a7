"""Citadel."""
