"""The SynthSR pipeline on one scan: conform to 1 mm LIA (covering the input's field of view),
network prediction of the T1 (flip-averaged), light unsharp masking, FreeSurfer's T1 scale.

The hybrid network renders the T1 from the image and SynthSeg's posteriors of it. Those come from
the whole ``mri_synthseg`` pipeline (1 mm posteriors sharpened by the scan's own intensity model),
not from the 2 mm network inside the hybrid alone: docs/mri_synthsr.md, 'Rendering from the
refined posteriors'."""

import numpy as np
from scipy import ndimage

from ... import geometry, predict, runtime
from ...cli import common
from ...labels import SEGMENTATION_LABELS, lr_swap_table
from ..synthseg.inference import content_box
from . import WM_T1


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

    #: the hybrid's U-Net is fed mri_synthseg's refined 1 mm posteriors (the SynthSeg pipeline
    #: with its intensity model) instead of its own 2 mm segmenter's: segmenting the output,
    #: OASIS 0455 1 mm 0.788 -> 0.823 mean Dice, 1x1x5 mm 0.784 -> 0.806; correlation with the
    #: real T1 0.758 -> 0.866 (docs/mri_synthsr.md). Off: the hybrid's own segmenter's 2 mm
    #: posteriors repeated to 1 mm (how models trained without ``refine_input`` saw them)
    refine = True

    #: the U-Net runs in tiles of at most this many voxels a side, overlapping by 32
    tile = 160

    def __init__(self, weights=None, card=None, seg_model=None, precision=None):
        """``seg_model``: the SynthSeg weights whose pipeline gives the posteriors with
        :attr:`refine` (default: the shipped model), or a loaded
        :class:`synthkit.models.synthseg.inference.Segmenter`; ``precision``: the networks'
        (default: SYNTHKIT_PRECISION, see :func:`synthkit.backend.inference_precision`)."""
        path, card = (weights, card) if card is not None else \
            common.find_model('synthsr', weights)
        self.precision = precision          # resolved by each runtime (synthkit.runtime)
        self.seg_model, self._pipeline = seg_model, None
        self.path, self.card = path, card
        self._keras_hybrid = None
        arch = card['architecture']
        #: the U-Net takes the image and SynthSeg's posteriors of it (the hybrid network)
        self.conditioned = arch['type'] == 'synthsr_hybrid'
        if self.conditioned:
            from ...nets import UNetConfig
            self.divisor = 2 * UNetConfig.from_dict(arch['segmenter']).divisor
            # run apart: the SynthSeg pipeline (or the hybrid's own segmenter) once on the whole
            # image (its batch norm on the whole image's statistics, as mri_synthseg runs it:
            # per-tile statistics show as seams), the U-Net in tiles on the image and those
            # posteriors; the U-Net on OpenVINO where it can be (no TensorFlow import)
            self.model = runtime.load_part(path, arch['unet'],
                                           card.get('input', {}).get('norm_statistics'),
                                           precision)
            if self.model is None:
                self.model = self._hybrid().get_layer('sr_core')
        else:
            self.model, cfg = runtime.load_unet(path, card, precision)
            self.divisor = cfg.divisor

    def _hybrid(self):
        """The whole Keras hybrid network (its segmenter, and its U-Net where OpenVINO does
        not compute it), built and loaded once when first wanted."""
        if self._keras_hybrid is None:
            from ... import backend
            from .task import load_hybrid
            self._keras_hybrid, _ = load_hybrid(self.path, self.card['architecture'],
                                                backend.inference_precision(self.precision))
        return self._keras_hybrid

    @property
    def segmenter(self):
        """The hybrid's own 2 mm SynthSeg network (Keras; loaded when first wanted: with
        :attr:`refine` the SynthSeg pipeline gives the posteriors instead), or None for a
        network that takes the image alone."""
        return self._hybrid().get_layer('frozen_synthseg') if self.conditioned else None

    def pipeline(self):
        """The SynthSeg pipeline (:class:`Segmenter`) giving the refined posteriors."""
        if self._pipeline is None:
            from ..synthseg.inference import Segmenter
            seg = self.seg_model
            self._pipeline = seg if isinstance(seg, Segmenter) else \
                Segmenter(seg, precision=self.precision)
            if tuple(self._pipeline.labels) != tuple(SEGMENTATION_LABELS):
                raise ValueError('the SynthSeg model gives other labels than the SynthSR '
                                 'network was trained on')
        return self._pipeline

    def synthesize(self, data, affine, flip=True, sharpening=True, crop=None, progress=None):
        """The synthetic 1 mm T1 of a 3-D array with its affine.

        The network sees the input's non-zero bounding box (and a margin) in tiles of at most
        160 voxels a side overlapping by 32 (each tile's outer 16 voxels, where the network's
        zero padding shows in a smooth image, give way to its neighbour's), so memory is
        bounded on large fields of view; voxels outside the input's field of view (or where the
        rescaled input is zero) are zero in the output. ``flip=False`` also runs the SynthSeg
        pipeline as ``--fast`` (one pass of each network)."""
        grid = geometry.conform((data, affine), voxsize=1.0, crop=crop, multiple=16)
        box = content_box(grid.data, self.divisor, margin=8)
        x = grid.data[box]
        out = np.zeros(grid.data.shape, np.float32)
        inputs, mirror = x, (0, [0])
        if self.conditioned:
            if self.refine:
                inputs = self.refined_inputs(data, affine, grid, box, crop, fast=not flip)
            else:
                inputs = self.inputs(x)
            mirror = (0, [0], [0] + [1 + i for i in lr_swap_table(SEGMENTATION_LABELS)])
        pred = predict.predict_tiled(self.model, inputs, tile=self.tile, overlap=32,
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

    def refined_inputs(self, data, affine, grid, box, crop=None, fast=False):
        """:class:`RefinedInputs` of the content ``box`` of ``grid`` (the conformed ``data``):
        the image and the SynthSeg pipeline's refined 1 mm posteriors (``fast``: as
        ``mri_synthseg --fast``), kept (float16) only in the brain's box."""
        sink = _BrainBox()
        seg = self.pipeline().segment(data, affine, fast=fast, crop=crop,
                                      keep_posteriors=sink.start)
        if seg.grid.data.shape != grid.data.shape or \
                not np.allclose(seg.grid.affine, grid.affine, atol=1e-4):
            raise RuntimeError('SynthSeg and SynthSR conformed the scan to different grids')
        region, post = sink.result(len(SEGMENTATION_LABELS), SEGMENTATION_LABELS.index(0))
        return RefinedInputs(grid.data[box], [s.start for s in box], post, region,
                             SEGMENTATION_LABELS.index(0))


class _BrainBox:
    """A ``keep_posteriors`` writer for :meth:`Segmenter.segment` that keeps the slabs it is
    given (float16) and joins them into their bounding box."""

    def start(self, grid, labels):
        self.parts = []
        return self

    def prepare(self, data):        # in the slabs' worker threads
        return predict.to_float16(data)

    def write(self, region, data):
        self.parts.append((region, data))

    def result(self, channels, bg):
        """(region: tuple of slices, posteriors float16 (X, Y, Z, C)) over the slabs' box,
        background 1 where no slab wrote."""
        if not self.parts:
            return (slice(0, 0),) * 3, np.zeros((0, 0, 0, channels), np.float16)
        lo = np.min([[s.start for s in r] for r, _ in self.parts], 0)
        hi = np.max([[s.stop for s in r] for r, _ in self.parts], 0)
        post = np.zeros(tuple(hi - lo) + (channels,), np.float16)
        post[..., bg] = 1
        while self.parts:
            region, part = self.parts.pop(0)
            post[tuple(slice(s.start - o, s.stop - o) for s, o in zip(region, lo))] = part
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), post


class RefinedInputs:
    """The U-Net's input (X, Y, Z, 1 + C) float16 of a 1 mm image (the part of the grid from
    ``origin`` on) and 1 mm posteriors known over ``region`` of the grid (background elsewhere),
    made box by box as :class:`TileInputs`."""

    ndim = 4

    def __init__(self, image, origin, post, region, bg):
        self.image, self.post, self.bg = image, post, bg
        self.origin = [int(o) for o in origin]
        self.region = [(s.start, s.stop) for s in region]
        self.shape = tuple(image.shape) + (1 + post.shape[-1],)

    def __getitem__(self, box):
        box = tuple(box) + (slice(None),) * (3 - len(tuple(box)))
        box = tuple(slice(*b.indices(n)[:2]) for b, n in zip(box, self.image.shape))
        out = np.zeros(tuple(b.stop - b.start for b in box) + (self.shape[-1],), np.float16)
        out[..., 0] = predict.to_float16(self.image[box])
        out[..., 1 + self.bg] = 1
        src, dst = [], []
        for b, o, (r0, r1) in zip(box, self.origin, self.region):
            a, z = max(b.start + o, r0), min(b.stop + o, r1)      # grid coordinates
            if a >= z:
                return out
            src.append(slice(a - r0, z - r0))
            dst.append(slice(a - o - b.start, z - o - b.start))
        out[tuple(dst) + (slice(1, None),)] = self.post[tuple(src)]
        return out


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
