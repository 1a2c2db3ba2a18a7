"""The REST front door: FastAPI routers, thin; the work is in the services."""
