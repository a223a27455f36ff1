"""The SynthStrip pipeline on one 3-D image: conform, signed distance network, back to the input
grid, brain mask."""

import numpy as np
from scipy import ndimage

from ... import geometry, predict, runtime


class Stripper:
    """The loaded distance network and how to run it on one 3-D image."""

    def __init__(self, path, card):
        self.model, self.cfg = runtime.load_unet(path, card, 'float32')
        self.voxsize = float(card['input'].get('voxsize_mm', 1.0))
        self.far = 2 * float((card.get('target') or {}).get('band_mm', 5.0))

    def distance(self, data, affine):
        """(signed distance on the input grid in mm, conformed image, distance there)."""
        conformed = geometry.conform((np.asarray(data, np.float32), affine), voxsize=self.voxsize,
                                     multiple=self.cfg.divisor * 2)
        sdt = predict.predict_tiled(self.model, conformed.data, tile=144, overlap=16,
                                    divisor=self.cfg.divisor, empty=[self.far])[..., 0]
        return geometry.to_input_grid(sdt, conformed, 'linear'), conformed.data, sdt


def brain_mask(sdt, border):
    """Voxels closer than ``border`` mm inside the boundary: largest component, holes filled."""
    return ndimage.binary_fill_holes(predict.largest_component(sdt < border))
