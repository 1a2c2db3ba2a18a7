"""Pure functions from an LLMModel to the Kubernetes objects it owns."""
