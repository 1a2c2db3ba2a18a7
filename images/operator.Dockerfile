# syntax=docker/dockerfile:1
# The Citadel operator (`citadel-operator`). Build from the repository root:
#   docker build -f images/operator.Dockerfile -t ghcr.io/citadel-ai/citadel-operator:0.1.0 .
# The base is pinned by tag; pin it by digest too in your registry mirror with
#   --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# Build: a wheel of this repository and a virtual environment with its
# dependencies; nothing of the toolchain reaches the final image.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY operator ./operator
COPY gateway ./gateway
RUN python -m venv /opt/citadel \
    && /opt/citadel/bin/pip install --no-compile '.[operator]' \
    && /opt/citadel/bin/python -m compileall -q /opt/citadel/lib

# Run: the interpreter, the virtual environment and an unprivileged user.
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/citadel/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /opt/citadel /opt/citadel
# 65532: the conventional "nonroot" user; the chart runs the container with the
# same numeric ids, a read-only root filesystem and no capabilities.
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["/opt/citadel/bin/citadel-operator"]
