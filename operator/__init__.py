"""Citadel's operator: reconciles LLMModel resources into vLLM deployments."""

__version__ = "0.1.0"
