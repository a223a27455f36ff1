"""Cortical parcellation (mri_synthseg --parc): the second network of SynthSeg 2.0."""
