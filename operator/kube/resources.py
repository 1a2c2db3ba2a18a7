"""The API resources the operator reads and writes, and their URL paths."""

from __future__ import annotations

from dataclasses import dataclass

from citadel.operator import names


@dataclass(frozen=True)
class Resource:
    """One API resource type.

    Attributes:
        group: the API group ("" for core).
        version: the API version.
        plural: the resource name in URLs.
        kind: the object kind.
        namespaced: True for namespaced resources.
    """

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        """`group/version`, or just the version for the core group."""
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self, namespace: str | None = None, name: str | None = None, sub: str = ""
    ) -> str:
        """The URL path of the collection, or of one object (and a subresource)."""
        base = f"/apis/{self.api_version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base


LLMMODELS = Resource(names.GROUP, names.VERSION, names.PLURAL, names.KIND)
DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment")
SERVICES = Resource("", "v1", "services", "Service")
PVCS = Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
PODS = Resource("", "v1", "pods", "Pod")
NODES = Resource("", "v1", "nodes", "Node", namespaced=False)
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
EVENTS = Resource("", "v1", "events", "Event")
PDBS = Resource("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget")
POD_MONITORS = Resource("monitoring.coreos.com", "v1", "podmonitors", "PodMonitor")
ENDPOINT_SLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice")
HPAS = Resource(
    "autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler"
)

KNOWN = (
    LLMMODELS,
    DEPLOYMENTS,
    SERVICES,
    PVCS,
    PODS,
    NODES,
    CONFIGMAPS,
    EVENTS,
    PDBS,
    POD_MONITORS,
    ENDPOINT_SLICES,
    HPAS,
)


def resource_for(api_version: str, kind: str) -> Resource:
    """The resource of an object's apiVersion and kind.

    Raises:
        KeyError: the operator does not know that kind.
    """
    for resource in KNOWN:
        if resource.api_version == api_version and resource.kind == kind:
            return resource
    raise KeyError(f"unknown resource {api_version} {kind}")
