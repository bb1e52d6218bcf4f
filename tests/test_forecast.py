"""Forecasts, checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from traice.forecast import forecast


def _rounds(energies: list[float], accuracies: list[float | None] | None = None) -> list[dict]:  # type: ignore[type-arg]
    accuracies = accuracies or [None] * len(energies)
    return [
        {"round": i, "energy_kwh": e, "emissions_kg": e * 0.1, "accuracy": a, "server_accuracy": None}
        for i, (e, a) in enumerate(zip(energies, accuracies), start=1)
    ]


def test_a_start_up_round_is_set_apart_from_the_rounds_to_come() -> None:
    # round 1 pays for start-up (10), the others cost 1: 10 + 1 + 8 x 1 = 19 at round 10
    result = forecast(_rounds([10.0, 1.0]), rounds_planned=10)

    assert result["energy_kwh_at_end"] == pytest.approx(19.0)
    assert result["emissions_kg_at_end"] == pytest.approx(1.9)
    assert result["carbontracker_energy_kwh_at_end"] == pytest.approx(100.0)  # 10 rounds x round 1


def test_the_median_of_recent_rounds_resists_a_straggler() -> None:
    result = forecast(_rounds([1.0, 1.0, 5.0, 1.0, 1.0]), rounds_planned=8)

    assert result["energy_kwh_at_end"] == pytest.approx(9.0 + 3 * 1.0)
    assert result["energy_kwh_interval"][0] <= result["energy_kwh_at_end"] <= result["energy_kwh_interval"][1]


def test_a_finished_run_forecasts_what_it_spent() -> None:
    result = forecast(_rounds([2.0, 1.0, 1.5]), rounds_planned=3)

    assert result["energy_kwh_at_end"] == pytest.approx(4.5)
    assert result["expected_error"] == 0


def test_nothing_to_forecast_yet() -> None:
    empty = forecast([], rounds_planned=10)
    unplanned = forecast(_rounds([1.0]), rounds_planned=None)

    assert empty["energy_kwh_at_end"] is None and empty["rounds_done"] == 0
    assert unplanned["energy_kwh_at_end"] is None and unplanned["energy_kwh_so_far"] == 1.0


def test_rounds_and_cost_to_a_target_accuracy() -> None:
    curve = [0.9 - 0.5 * math.exp(-0.3 * r) for r in range(1, 7)]  # a=0.9, b=0.5, c=0.3
    result = forecast(_rounds([1.0] * 6, curve), rounds_planned=50, target_accuracy=0.85)

    needed = math.ceil(-math.log((0.9 - 0.85) / 0.5) / 0.3)  # 7.67 -> 8
    target = result["target"]
    assert target["reachable"] is True and target["rounds_needed"] == needed
    assert target["energy_kwh"] == pytest.approx(6.0 + (needed - 6) * 1.0)
    assert target["asymptote"] == pytest.approx(0.9, abs=0.01)


def test_an_accuracy_above_the_plateau_is_unreachable_and_one_reached_is_reported() -> None:
    curve = [0.8 - 0.4 * math.exp(-0.5 * r) for r in range(1, 7)]

    above = forecast(_rounds([1.0] * 6, curve), rounds_planned=50, target_accuracy=0.95)["target"]
    reached = forecast(_rounds([1.0] * 6, curve), rounds_planned=50, target_accuracy=0.6)["target"]

    assert above["reachable"] is False and above["asymptote"] < 0.95
    first = next(i for i, a in enumerate(curve, start=1) if a >= 0.6)
    assert reached == {"accuracy": 0.6, "reachable": True, "rounds_needed": first, "energy_kwh": float(first),
                       "emissions_kg": pytest.approx(first * 0.1)}
