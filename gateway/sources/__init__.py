"""Where routes, replicas and keys come from: files or the Kubernetes API."""
