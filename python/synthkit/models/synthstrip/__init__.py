"""SynthStrip: skull stripping by the signed distance to the brain boundary."""
