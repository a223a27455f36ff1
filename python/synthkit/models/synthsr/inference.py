"""The SynthSR pipeline on one scan: conform to 1 mm LIA (covering the input's field of view),
network prediction of the T1 (flip-averaged), light unsharp masking, FreeSurfer's T1 scale."""

import numpy as np
from scipy import ndimage

from ... import geometry, nets, predict
from ...cli import common
from ...labels import SEGMENTATION_LABELS, lr_swap_table
from ..synthseg.inference import content_box
from .task import WM_T1


class Result:
    """One scan's synthetic T1 ``image`` (float32, white matter about 110) on the 1 mm grid
    ``grid`` (a Conformed whose data is the rescaled input)."""

    def __init__(self, image, grid):
        self.image, self.grid = image, grid


def sharpen(image, amount=0.5, sigma_mm=1.0, mask=None):
    """Unsharp masking: ``image + amount * (image - blur(image))``, not below zero; outside
    ``mask`` (if given) the image is left as it is."""
    blurred = ndimage.gaussian_filter(image, sigma_mm)
    out = image + np.float32(amount) * (image - blurred)
    np.maximum(out, 0, out=out)
    if mask is not None:
        out = np.where(mask, out, image)
    return out.astype(np.float32, copy=False)


class Synthesizer:
    """The loaded network and how to turn one scan into a 1 mm T1."""

    def __init__(self, weights=None, card=None):
        path, card = (weights, card) if card is not None else \
            common.find_model('synthsr', weights)
        self.segmenter = None
        if card['architecture']['type'] == 'synthsr_hybrid':
            from .task import load_hybrid
            hybrid, self.divisor = load_hybrid(path, card['architecture'])
            # run apart: the segmenter once on the whole image (its batch norm on the whole
            # image's statistics, as mri_synthseg runs it: per-tile statistics show as seams),
            # the U-Net in tiles on the image and those posteriors
            self.segmenter = hybrid.get_layer('frozen_synthseg')
            self.model = hybrid.get_layer('sr_core')
        else:
            self.model, cfg = nets.load_unet(path, card)
            self.divisor = cfg.divisor
        self.card = card

    def synthesize(self, data, affine, flip=True, sharpening=True, crop=None, progress=None):
        """The synthetic 1 mm T1 of a 3-D array with its affine.

        The network sees the input's non-zero bounding box (and a margin) in tiles of at most
        160 voxels a side overlapping by 32 (each tile's outer 16 voxels, where the network's
        zero padding shows in a smooth image, give way to its neighbour's), so memory is
        bounded on large fields of view; voxels outside the input's field of view (or where the
        rescaled input is zero) are zero in the output."""
        grid = geometry.conform((data, affine), voxsize=1.0, crop=crop, multiple=16)
        box = content_box(grid.data, self.divisor, margin=8)
        x = grid.data[box]
        out = np.zeros(grid.data.shape, np.float32)
        inputs, mirror = x, (0, [0])
        if self.segmenter is not None:
            inputs = self.inputs(x)
            mirror = (0, [0], [0] + [1 + i for i in lr_swap_table(SEGMENTATION_LABELS)])
        pred = predict.predict_tiled(self.model, inputs, tile=160, overlap=32,
                                     divisor=self.divisor,
                                     flip=mirror if flip else None, empty=[0.0],
                                     progress=progress)[..., 0]
        del inputs
        np.maximum(pred, 0, out=pred)
        pred *= np.float32(WM_T1)
        inside = ndimage.binary_dilation(x > 0, iterations=2)
        pred[~inside] = 0
        if sharpening:
            pred = sharpen(pred, mask=inside)
        out[box] = pred
        return Result(out, grid)

    def with_posteriors(self, x):
        """(X, Y, Z, 34) float16: the image ``x`` (sizes multiples of 2) and the segmenter's
        posteriors of it, computed at 2 mm (2x2x2 averages, min-max normalized, as in training)
        and repeated back to 1 mm (nearest neighbour, as the network was trained)."""
        inputs = self.inputs(x)
        return inputs[tuple(slice(0, n) for n in x.shape)]

    def inputs(self, x):
        """:meth:`with_posteriors` as a :class:`TileInputs`: built tile by tile on demand."""
        n = [s // 2 for s in x.shape]
        low = x.reshape(n[0], 2, n[1], 2, n[2], 2).mean((1, 3, 5))
        low = (low - low.min()) / (low.max() - low.min() + 1e-6)
        divisor = self.divisor // 2
        pad = [(0, -k % divisor) for k in n]
        post = np.asarray(self.segmenter.predict_on_batch(np.pad(low, pad)[None, ..., None]),
                          np.float32)[0][:n[0], :n[1], :n[2]]
        return TileInputs(x, predict.to_float16(post))


class TileInputs:
    """The U-Net's input (X, Y, Z, 1 + C) float16 of a 1 mm image and its segmenter's 2 mm
    posteriors, made box by box when :func:`synthkit.predict.predict_tiled` asks for a tile
    (``inputs[box]``), never whole: at 256^3 the whole would be 1.1 GB."""

    ndim = 4

    def __init__(self, image, post):
        self.image, self.post = image, post
        self.shape = tuple(image.shape) + (1 + post.shape[-1],)

    def __getitem__(self, box):
        box = tuple(box) + (slice(None),) * (3 - len(tuple(box)))
        ranges = [np.arange(n)[b] for n, b in zip(self.image.shape, box)]
        out = np.empty(tuple(len(r) for r in ranges) + (self.shape[-1],), np.float16)
        out[..., 0] = predict.to_float16(self.image[box])
        out[..., 1:] = self.post[np.ix_(*[r // 2 for r in ranges])]   # nearest: 2 mm -> 1 mm
        return out
