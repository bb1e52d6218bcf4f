"""Forecasts from the rounds so far: energy and emissions at the end of the run, and to a target accuracy.

Carbontracker predicts a whole training as epochs × the energy of the first epoch. In FL the
first round also pays for start-up (processes, imports, hardware detection), so that forecast
overshoots by the start-up cost times the number of rounds. TRAICE instead:

- counts what has been spent, and forecasts only the rounds still to come;
- treats a first round costing more than twice the median of later rounds as start-up, not as
  a typical round;
- takes the median of the latest (up to 10) typical rounds as the cost of a round to come, robust
  to a slow straggler round;
- gives a 90 % interval from the spread of those rounds (1.4826 × MAD as sigma, independent rounds).

For the target accuracy it fits ``accuracy(round) = a - b·exp(-c·round)`` to the accuracy curve.
"""

from __future__ import annotations

import math
from statistics import median
from typing import Any

WINDOW = 10
Z90 = 1.645


def _typical(values: list[float]) -> list[float]:
    """The rounds that say what a round to come costs: without a start-up first round."""
    if len(values) >= 2 and values[0] > 2 * median(values[1:]):
        return values[1:]
    return values


def _per_round(values: list[float]) -> tuple[float, float]:
    """(cost of a round to come, sigma of one round) from the rounds so far."""
    recent = _typical(values)[-WINDOW:]
    middle = median(recent)
    sigma = 1.4826 * median(abs(v - middle) for v in recent) if len(recent) >= 3 else 0.25 * middle
    return middle, sigma


def _accuracy_curve(points: list[tuple[int, float]]) -> tuple[float, float, float] | None:
    """Least-squares fit of ``a - b·exp(-c·r)``: a grid over c, closed form for a and b."""
    if len(points) < 3:
        return None
    best: tuple[float, float, float, float] | None = None
    for i in range(80):
        c = 10 ** (-3 + 4 * i / 79)  # 0.001 .. 10
        xs = [math.exp(-c * r) for r, _ in points]
        ys = [a for _, a in points]
        n, sx, sy = len(xs), sum(xs), sum(ys)
        sxx, sxy = sum(x * x for x in xs), sum(x * y for x, y in zip(xs, ys))
        det = n * sxx - sx * sx
        if abs(det) < 1e-12:
            continue
        slope = (n * sxy - sx * sy) / det  # = -b
        intercept = (sy - slope * sx) / n  # = a
        sse = sum((intercept + slope * x - y) ** 2 for x, y in zip(xs, ys))
        if best is None or sse < best[0]:
            best = (sse, intercept, -slope, c)
    return None if best is None else best[1:]


def forecast(
    rounds: list[dict[str, Any]], rounds_planned: int | None, target_accuracy: float | None = None
) -> dict[str, Any]:
    """Forecast from a run's rounds (as ``GET /api/runs/{id}/rounds`` returns them)."""
    done = len(rounds)
    energy = [float(r["energy_kwh"]) for r in rounds]
    emissions = [float(r["emissions_kg"]) for r in rounds]
    out: dict[str, Any] = {
        "rounds_done": done,
        "rounds_planned": rounds_planned,
        "energy_kwh_so_far": sum(energy),
        "emissions_kg_so_far": sum(emissions),
        "energy_kwh_at_end": None,
        "emissions_kg_at_end": None,
        "expected_error": None,
        "energy_kwh_interval": None,
        "carbontracker_energy_kwh_at_end": None,
        "method": "spent so far + rounds to come x median of the latest typical rounds (start-up round set apart)",
        "target": None,
    }
    if done == 0:
        return out
    last_round = max(int(r["round"]) for r in rounds)
    if rounds_planned:
        remaining = max(0, rounds_planned - last_round)
        energy_round, energy_sigma = _per_round(energy)
        emissions_round, _ = _per_round(emissions)
        total = sum(energy) + remaining * energy_round
        spread = Z90 * energy_sigma * math.sqrt(remaining)
        out.update(
            energy_kwh_at_end=total,
            emissions_kg_at_end=sum(emissions) + remaining * emissions_round,
            expected_error=spread / total if total > 0 else None,
            energy_kwh_interval=[max(sum(energy), total - spread), total + spread],
            carbontracker_energy_kwh_at_end=rounds_planned * energy[0],
        )
    if target_accuracy is not None:
        out["target"] = _to_target(rounds, target_accuracy, energy, emissions, last_round)
    return out


def _to_target(
    rounds: list[dict[str, Any]], target: float, energy: list[float], emissions: list[float], last_round: int
) -> dict[str, Any]:
    points = []
    for r in rounds:
        accuracy = r.get("server_accuracy") if r.get("server_accuracy") is not None else r.get("accuracy")
        if accuracy is not None:
            points.append((int(r["round"]), float(accuracy)))
    result: dict[str, Any] = {"accuracy": target, "reachable": None, "rounds_needed": None,
                              "energy_kwh": None, "emissions_kg": None}
    reached = next((r for r, a in points if a >= target), None)
    if reached is not None:
        spent = [(float(x["energy_kwh"]), float(x["emissions_kg"])) for x in rounds if int(x["round"]) <= reached]
        return result | {"reachable": True, "rounds_needed": reached, "energy_kwh": sum(e for e, _ in spent),
                         "emissions_kg": sum(m for _, m in spent)}
    fit = _accuracy_curve(points)
    if fit is None:
        return result
    a, b, c = fit
    if target >= a or b <= 0:
        return result | {"reachable": False, "asymptote": a}
    needed = math.ceil(-math.log((a - target) / b) / c)
    more = max(0, needed - last_round)
    energy_round, _ = _per_round(energy)
    emissions_round, _ = _per_round(emissions)
    return result | {"reachable": True, "rounds_needed": needed, "asymptote": a,
                     "energy_kwh": sum(energy) + more * energy_round,
                     "emissions_kg": sum(emissions) + more * emissions_round}
