"""A small typed async Kubernetes client (aiohttp): get, list, watch, create, delete."""
