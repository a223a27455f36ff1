"""SynthSeg: whole-brain segmentation (33 aseg labels) of scans of any contrast and resolution."""
