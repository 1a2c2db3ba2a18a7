"""Each program runs on its own extra: the operator image installs
`citadel[operator]`, the gateway image `citadel[gateway]` (images/*.Dockerfile).

No image is built here, so each program's entry module is imported in a fresh
interpreter that cannot import anything its image would lack: the other extra and
the development tools (resolved from the installed distributions' metadata,
transitive dependencies included).
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Console script -> the extra its image installs.
SCRIPTS = {
    "citadel-operator": "operator",
    "citadel-gateway": "gateway",
    "citadel": "gateway",
}


def _name(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _installed(requirement: Requirement, extra: str) -> bool:
    """Whether a distribution's `requirement` is installed with `extra` ("": none)."""
    if requirement.marker is None:
        return extra == ""
    return requirement.marker.evaluate({"extra": extra})


def closure(requirements: list[str]) -> set[str]:
    """The distributions `requirements` install, transitively (normalized names)."""
    # (distribution, its extras): markers are evaluated on the edge that adds it.
    parsed = [Requirement(r) for r in requirements]
    todo = [(r.name, r.extras) for r in parsed if _installed(r, "")]
    seen: set[str] = set()
    done: set[tuple[str, str]] = set()
    while todo:
        distribution, extras = todo.pop()
        name = _name(distribution)
        seen.add(name)
        for extra in ["", *sorted(extras)]:
            if (name, extra) not in done:
                done.add((name, extra))
                needs = [Requirement(r) for r in md.requires(name) or []]
                todo.extend((r.name, r.extras) for r in needs if _installed(r, extra))
    return seen


# In every image's virtual environment besides the extra: the package itself and
# what `python -m venv` puts there.
ALWAYS = {"citadel", "pip", "setuptools"}


def hidden_modules(own: str) -> set[str]:
    """Top-level modules of this environment that the image of `own` lacks: the
    other extra's, and the development tools'."""
    mine = closure([*PROJECT["dependencies"], *PROJECT["optional-dependencies"][own]])
    return {
        module
        for module, dists in md.packages_distributions().items()
        if not {_name(d) for d in dists} & (mine | ALWAYS)
    }


def test_the_extras_keep_the_heavy_stacks_apart() -> None:
    assert {"fastapi", "grpc", "strawberry", "uvicorn"} <= hidden_modules("operator")
    assert {"kopf"} <= hidden_modules("gateway")
    assert {"httpx", "pytest"} <= hidden_modules("gateway")  # dev tools only


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_program_imports_with_only_its_extra(script: str) -> None:
    entry = PROJECT["scripts"][script].split(":")[0]
    hidden = sorted(hidden_modules(SCRIPTS[script]))
    probe = textwrap.dedent(
        f"""
        import importlib.machinery as m, sys
        HIDDEN = set({hidden!r})
        class Image(m.PathFinder):
            # Not found, as in the image: importing fails, and a library that
            # probes for an optional module (find_spec) sees it absent.
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                if name.partition(".")[0] in HIDDEN:
                    return None
                return super().find_spec(name, path, target)
        sys.meta_path[:] = [Image if f is m.PathFinder else f for f in sys.meta_path]
        import {entry}
        """
    )
    # -P: the repository root (with its folder operator/) stays off sys.path.
    done = subprocess.run(
        [sys.executable, "-P", "-c", probe],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
