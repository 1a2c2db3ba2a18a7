"""The entry point: settings read from the environment and handed to Kopf."""

from __future__ import annotations

import pytest

from citadel.operator.kopfstate import MemoryState
from citadel.operator.main import kopf_settings, main
from citadel.operator.settings import OperatorSettings

pytestmark = pytest.mark.unit


def test_the_peering_lifetime_reaches_kopf(settings: OperatorSettings) -> None:
    assert kopf_settings(settings, MemoryState()).peering.lifetime == 60
    longer = settings.model_copy(update={"peering_lifetime_seconds": 120})
    assert kopf_settings(longer, MemoryState()).peering.lifetime == 120


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("LOG_FORMAT", "xml", "CITADEL_OPERATOR_LOG_FORMAT='xml': Input should be"),
        # Not JSON: pydantic-settings fails before validating.
        ("POD_MONITOR_LABELS", "release=kps", 'field "pod_monitor_labels"'),
    ],
)
def test_bad_settings_stop_the_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    said: str,
) -> None:
    monkeypatch.setenv(f"CITADEL_OPERATOR_{variable}", value)
    with pytest.raises(SystemExit) as stopped:
        main([])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("citadel-operator: invalid settings\n")
    assert said in err
