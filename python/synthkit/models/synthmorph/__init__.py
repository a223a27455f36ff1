"""SynthMorph: affine and deformable registration of any two brain scans."""
