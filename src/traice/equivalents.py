"""Human-readable equivalents of an amount of CO2e, each factor with its source in the code and in the data.

Few factors, each from a public body and used only for what it measures. They are rough comparisons:
the car figures are tailpipe CO2 only, and a phone charge's emissions depend on the grid it is charged from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# European Environment Agency, provisional 2023 monitoring data under Regulation (EU) 2019/631 (published
# June 2024): new passenger cars registered in the EU, Iceland and Norway in 2023 emitted on average
# 106.6 g CO2/km, type-approval values (WLTP); electric cars count as 0 g/km. (2022: 108.1 g/km.)
EEA_NEW_CAR_2023_KG_PER_KM = 0.1066
EEA_NEW_CAR_SOURCE = (
    "EEA, CO2 emissions of new passenger cars in Europe, provisional 2023 data (June 2024): "
    "106.6 g CO2/km on average (WLTP type-approval, EU + Iceland + Norway)"
)

# US EPA, "Tailpipe Greenhouse Gas Emissions from a Typical Passenger Vehicle", EPA-420-F-23-014 (June 2023):
# a typical passenger vehicle emits about 400 g CO2 per mile (8,887 g CO2 per gallon of gasoline, ~22 mpg).
EPA_TYPICAL_CAR_KG_PER_MILE = 0.400
EPA_TYPICAL_CAR_SOURCE = (
    "US EPA, Tailpipe Greenhouse Gas Emissions from a Typical Passenger Vehicle, EPA-420-F-23-014 (June 2023): "
    "about 400 g CO2 per mile"
)

# US EPA, Greenhouse Gas Equivalencies Calculator, "Calculations and References", 2024 edition (eGRID2022
# emission rates of delivered electricity): 1.24 x 10^-5 metric tons CO2 per smartphone charged.
# Editions before 2024 said 8.22 x 10^-6; this is a US-grid figure.
EPA_SMARTPHONE_CHARGE_KG = 0.0124
EPA_SMARTPHONE_SOURCE = (
    "US EPA, Greenhouse Gas Equivalencies Calculator, Calculations and References, 2024 edition (eGRID2022): "
    "0.0124 kg CO2 per smartphone charged, US grid"
)


@dataclass(frozen=True)
class Factor:
    """One equivalent: how many kilograms of CO2 one ``unit`` of ``label`` stands for, and where that comes from."""

    key: str
    label: str
    unit: str
    kg_co2_per_unit: float
    source: str


FACTORS: tuple[Factor, ...] = (
    Factor("car_km_eea", "driven by an average new car in Europe (2023)", "km", EEA_NEW_CAR_2023_KG_PER_KM,
           EEA_NEW_CAR_SOURCE),
    Factor("car_miles_epa", "driven by a typical US passenger vehicle", "miles", EPA_TYPICAL_CAR_KG_PER_MILE,
           EPA_TYPICAL_CAR_SOURCE),
    Factor("smartphone_charges", "charged (US grid)", "smartphone charges", EPA_SMARTPHONE_CHARGE_KG,
           EPA_SMARTPHONE_SOURCE),
)


def equivalents(emissions_kg: float) -> list[dict[str, Any]]:
    """``emissions_kg`` expressed with each factor: key, label, unit, value, kg_co2_per_unit and source."""
    return [
        {
            "key": f.key,
            "label": f.label,
            "unit": f.unit,
            "value": emissions_kg / f.kg_co2_per_unit,
            "kg_co2_per_unit": f.kg_co2_per_unit,
            "source": f.source,
        }
        for f in FACTORS
    ]
