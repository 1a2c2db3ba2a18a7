"""The benchmark's child processes run the code of the checkout it runs from."""

import subprocess
import sys

import pytest
from citadel_bench.procs import REPO, bench_env

pytestmark = pytest.mark.unit


def test_children_import_citadel_from_this_checkout() -> None:
    # An editable install may point at another checkout (the main one, being
    # edited): the gateway measured must be the code beside the benchmark.
    shown = subprocess.run(
        [sys.executable, "-c", "import citadel.gateway as g; print(g.__file__)"],
        env=bench_env(),
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    assert shown.stdout.strip().startswith(str(REPO / "src") + "/")
