"""SynthSR: super-resolution and contrast transfer to a 1 mm MPRAGE-like T1."""
