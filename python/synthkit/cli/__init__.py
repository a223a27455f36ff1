"""Command lines that are not one model's: shared helpers (:mod:`.common`) and ``mri_synth``, the
generator's own tool."""
