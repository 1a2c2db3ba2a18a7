"""A narrow, typed Kubernetes API client: the interface, an aiohttp implementation
and an in-memory fake for tests."""

from citadel.operator.kube.client import ApiError, Kube, Manifest
from citadel.operator.kube.resources import Resource, resource_for

__all__ = ["ApiError", "Kube", "Manifest", "Resource", "resource_for"]
