"""TRAICE quickstart: a Flower app whose energy and carbon are tracked by TRAICE."""
