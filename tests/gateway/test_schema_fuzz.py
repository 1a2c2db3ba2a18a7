"""schemathesis against the gateway's OpenAPI document: no request gets a 5xx."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration


def test_no_generated_request_gets_a_server_error(
    tmp_path: Path, start_backend: Any, start_gateway: Any, helpers: Any
) -> None:
    backend = start_backend("a")
    keys = tmp_path / "keys.json"
    key = helpers.create_key(keys, "fuzz")
    gateway = start_gateway([helpers.route("smol", [backend])], keys)
    # The gateway's own document, with the one real model name filled in so that
    # generated requests reach the whole request path, not only 404s.
    schema = httpx.get(gateway.url + "/openapi.json").json()
    for path in schema["paths"].values():
        for operation in path.values():
            content = operation.get("requestBody", {}).get("content", {})
            for media in content.values():
                media["schema"]["properties"]["model"] = {"enum": ["smol"]}
    schema_file = tmp_path / "openapi.json"
    schema_file.write_text(json.dumps(schema))
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            str(schema_file),
            "--url",
            gateway.url,
            "--checks",
            "not_a_server_error",
            "--header",
            f"Authorization: Bearer {key}",
            "--max-examples",
            "30",
            "--seed",
            "1",
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
