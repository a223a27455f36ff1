"""SynthSR: super-resolution and contrast transfer to a 1 mm MPRAGE-like T1."""

#: FreeSurfer's T1 scale: white matter is normalized to 110 (the training target's and the
#: output's; here so that the inference needs no import of the training code, nor Keras)
WM_T1 = 110.0
