"""Grid carbon intensity, network energy, and the conversion of energy to emissions.

Intensities come from the annual data that codecarbon ships (``global_energy_mix.json`` and its
sub-national files), so nothing is looked up on the network; an hourly trace in the Electricity
Maps CSV format can replace them for the parties whose zone it covers. Emissions are computed by
TRAICE, not by codecarbon, so that the intensity each party used is recorded and can be changed.
Defaults and their sources: ``../shared/CARBON_MODEL.md`` and the README.
"""

from __future__ import annotations

import csv
import json
from bisect import bisect_right
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

#: World average used when a party's country is unknown: IEA 2019 world average, as in codecarbon.
WORLD_INTENSITY_G_PER_KWH = 475.0
#: Energy of moving data through the internet, kWh per decimal GB. Tapp et al. 2026 (NVFlare +
#: codecarbon study); Aslan et al. 2018 give 0.06 kWh/GB for 2015, halving about every 2 years.
NETWORK_KWH_PER_GB = 0.01
LBS_PER_MWH_TO_G_PER_KWH = 453.59237 / 1000.0  # eGRID publishes lbs/MWh


@dataclass(frozen=True)
class Intensity:
    """A grid carbon intensity and where it came from."""

    g_per_kwh: float
    country_iso_code: str | None
    source: str
    region: str | None = None


def _data(*parts: str) -> Any:
    path = resources.files("codecarbon").joinpath("data", *parts)
    return json.loads(path.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _energy_mix() -> dict[str, dict[str, Any]]:
    return _data("private_infra", "global_energy_mix.json")  # type: ignore[no-any-return]


@lru_cache(maxsize=None)
def _regions(country: str) -> dict[str, tuple[float, str]]:
    """Sub-national intensities codecarbon ships: region name or code (lower case) -> (g/kWh, source)."""
    found: dict[str, tuple[float, str]] = {}
    if country == "USA":
        for name, entry in _data("private_infra", "2023", "usa_emissions.json").items():
            if not name.startswith("_"):
                value = float(entry["emissions"]) * LBS_PER_MWH_TO_G_PER_KWH
                found[name] = found[entry["regionCode"].lower()] = (value, "EPA eGRID 2023 (codecarbon)")
    elif country == "CHN":
        for code, entry in _data("private_infra", "2023", "china_provincial_emissions.json")["data"].items():
            value = float(entry["emission_factor"])
            for key in [code.lower(), *entry.get("names", [])]:
                found[key.lower()] = (value, f"China provincial factors {entry.get('year', '')} (codecarbon)")
    elif country == "CAN":
        per_source = _data("private_infra", "carbon_intensity_per_source.json")
        weights = {"naturalGas": "natural_gas", "petroleum": "petroleum", "coal": "coal", "nuclear": "nuclear",
                   "hydro": "hydroelectricity", "wind": "wind", "solar": "solar", "biomass": "biofuel",
                   "tidal": "other_renewable", "other": "other_renewable"}
        for province, mix in _data("private_infra", "2023", "canada_energy_mix.json").items():
            total = sum(float(mix.get(k, 0)) for k in weights) or 1.0
            value = sum(float(mix.get(k, 0)) * float(per_source.get(v, 0)) for k, v in weights.items()) / total
            found[province] = (value, "Canadian provincial mix 2023 (codecarbon)")
    return found


def known_countries() -> list[str]:
    """ISO 3166-1 alpha-3 codes that codecarbon has an annual intensity for."""
    return sorted(_energy_mix())


def intensity_for(country_iso_code: str | None, region: str | None = None) -> Intensity:
    """Annual grid intensity of a country (ISO alpha-3) or one of its regions, else the world average.

    Regions are known for the USA (state names or codes), China (provinces) and Canada
    (provinces), as codecarbon ships them; another region falls back to its country. A country
    code that is given but unknown is refused, so a typo never silently becomes the world average.
    """
    if country_iso_code is None:
        return Intensity(WORLD_INTENSITY_G_PER_KWH, None, "world average (IEA 2019, codecarbon)", region)
    code = country_iso_code.upper()
    entry = _energy_mix().get(code)
    if entry is None:
        raise ValueError(
            f"unknown country ISO code {country_iso_code!r}: use an ISO 3166-1 alpha-3 code "
            "such as FRA, USA or DEU"
        )
    if region:
        regional = _regions(code).get(region.strip().lower())
        if regional is not None:
            return Intensity(regional[0], code, regional[1], region)
    return Intensity(float(entry["carbon_intensity"]), code, f"codecarbon global_energy_mix {entry.get('year', '')}",
                     region)


def emissions_kg(energy_kwh: float, intensity_g_per_kwh: float) -> float:
    """kg CO2e of ``energy_kwh`` drawn from a grid of the given intensity."""
    return energy_kwh * intensity_g_per_kwh / 1000.0


def network_energy_kwh(num_bytes: float, kwh_per_gb: float = NETWORK_KWH_PER_GB) -> float:
    """Energy of moving ``num_bytes`` through the network (decimal GB)."""
    return num_bytes / 1e9 * kwh_per_gb


def zone_of(country_iso_code: str | None, region: str | None = None) -> str | None:
    """The Electricity Maps zone id of a party: its region if it is one (``US-CAL-CISO``), else the
    ISO alpha-2 code of its country (``FR``)."""
    if region and region.upper() == region and "-" in region:
        return region
    if not country_iso_code:
        return None
    import pycountry  # a codecarbon dependency

    country = pycountry.countries.get(alpha_3=country_iso_code.upper())
    return None if country is None else str(country.alpha_2)


# --------------------------------------------------------------------------- hourly traces

#: A SYNTHETIC 48-hour trace for FR and DE from 2026-01-01 (plausible shape, not measured data),
#: for trying ``--intensity-trace`` and for tests.
SAMPLE_TRACE = Path(str(resources.files("traice") / "data" / "traces" / "synthetic-hourly-FR-DE-2026-01-01.csv"))

DATETIME_COLUMN = "Datetime (UTC)"
ZONE_COLUMN = "Zone Id"
LCA_COLUMNS = ("Carbon Intensity gCO₂eq/kWh (LCA)", "Carbon Intensity gCO₂eq/kWh (Life cycle)")
DIRECT_COLUMN = "Carbon Intensity gCO₂eq/kWh (direct)"


@dataclass
class IntensityTrace:
    """An hourly carbon-intensity trace per zone, replayed over the intervals energy was used in."""

    name: str
    basis: str = "lca"
    hours: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)  # zone -> (starts, g/kWh)

    @classmethod
    def from_csv(cls, path: str | Path, basis: str = "lca") -> IntensityTrace:
        """Read an Electricity Maps hourly CSV (columns ``Datetime (UTC)``, ``Zone Id`` and the
        direct or life-cycle intensity in gCO₂eq/kWh)."""
        if basis not in ("lca", "direct"):
            raise ValueError("basis must be 'lca' or 'direct'")
        path = Path(path)
        rows: dict[str, list[tuple[float, float]]] = {}
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            wanted = [DIRECT_COLUMN] if basis == "direct" else list(LCA_COLUMNS)
            value_column = next((c for c in wanted if c in columns), None)
            missing = [c for c in (DATETIME_COLUMN, ZONE_COLUMN) if c not in columns]
            if value_column is None or missing:
                raise ValueError(
                    f"{path.name} is not an Electricity Maps hourly CSV: needs columns {DATETIME_COLUMN!r}, "
                    f"{ZONE_COLUMN!r} and {' or '.join(repr(c) for c in wanted)}"
                )
            for line, row in enumerate(reader, start=2):
                try:
                    when = datetime.fromisoformat(row[DATETIME_COLUMN].strip().replace("Z", "+00:00"))
                    value = float(row[value_column])
                except (ValueError, TypeError) as exc:
                    raise ValueError(f"{path.name} line {line}: {exc}") from None
                if when.tzinfo is None:
                    when = when.replace(tzinfo=timezone.utc)
                rows.setdefault(row[ZONE_COLUMN].strip(), []).append((when.timestamp(), value))
        if not rows:
            raise ValueError(f"{path.name} has no rows")
        trace = cls(name=path.name, basis=basis)
        for zone, points in rows.items():
            points.sort()
            trace.hours[zone] = ([p[0] for p in points], [p[1] for p in points])
        return trace

    @property
    def zones(self) -> list[str]:
        return sorted(self.hours)

    def intensity(self, zone: str | None, start: float, end: float) -> float | None:
        """Mean intensity over ``[start, end]`` (unix seconds), each hour weighted by its overlap;
        None if the trace does not cover ``zone``. Outside the trace the nearest hour holds."""
        if zone not in self.hours:
            return None
        starts, values = self.hours[zone]  # type: ignore[index]
        if end <= start:
            return values[max(0, bisect_right(starts, start) - 1)]
        total = weighted = 0.0
        i = max(0, bisect_right(starts, start) - 1)
        t = start
        while t < end:
            hour_end = starts[i + 1] if i + 1 < len(starts) else float("inf")
            upto = min(end, hour_end)
            weighted += values[i] * (upto - t)
            total += upto - t
            t = upto
            i = min(i + 1, len(starts) - 1) if upto == hour_end else i
        return weighted / total


@dataclass
class CarbonModel:
    """The server's assumptions: network energy intensity and an optional hourly trace."""

    network_kwh_per_gb: float = NETWORK_KWH_PER_GB
    trace: IntensityTrace | None = None

    def intensity(self, annual_g_per_kwh: float, zone: str | None, start: float | None, end: float | None) -> float:
        """The intensity to charge an interval with: the trace's hours if it covers the zone."""
        if self.trace is not None and start is not None and end is not None:
            replayed = self.trace.intensity(zone, start, end)
            if replayed is not None:
                return replayed
        return annual_g_per_kwh

    def describe(self) -> dict[str, Any]:
        return {
            "network_kwh_per_gb": self.network_kwh_per_gb,
            "network_source": "Tapp et al. 2026; range 0.005-0.06 kWh/GB (Aslan et al. 2018)",
            "intensity_trace": None if self.trace is None else {"file": self.trace.name, "basis": self.trace.basis,
                                                                 "zones": self.trace.zones},
        }
