"""The bench code lives in bench/ (packages `citadel_bench` and `simulator`), which
pyproject.toml puts on pytest's pythonpath."""
