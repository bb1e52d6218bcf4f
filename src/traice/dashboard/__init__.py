"""Static dashboard files served by the TRAICE server (no build step)."""
