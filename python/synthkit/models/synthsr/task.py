"""Training task of the SynthSR network: synthetic image of any contrast and resolution -> the
1 mm MPRAGE-like T1 of the same (deformed) anatomy.

Two kinds of training data share one bank:

* real subjects (a FreeSurfer subject folder with ``T1.mgz`` and ``aseg.mgz`` on one grid): the
  generator paints the aseg plus intensity clusters of the head outside the brain
  (:func:`subject_generation_labels`), and the target is the real T1 sampled at the very points
  the synthetic image was sampled from (the seed's recipe);
* label maps without a T1 (the whole-head training maps): the target is a T1 rendered from the
  deformed labels (:func:`render_t1`): a typical MPRAGE intensity per label, a smooth
  within-structure variation and a little partial-volume blur.

Loss: L1 to the target (in units of white matter: FreeSurfer's T1 scale / 110) plus
``seg_weight`` x soft Dice between the deformed labels and the segmentation of the prediction by
the frozen SynthSeg network (at its 2 mm grid), which keeps boundaries sharp.
"""

import dataclasses
import functools
import os

import keras
import numpy as np
from keras import ops
from scipy import ndimage

from ... import labels as lab
from ... import backend, losses, nets
from ... import generator as gen
from ...task import Options, Task, TrainConfig, resolve_subject, subjects_beside
from . import WM_T1  # FreeSurfer's T1 scale, shared with the inference

#: Typical MPRAGE intensity of each generation label (white matter 160): SynthSeg's T1 priors
#: (``prior_means_t1`` of its release, first row, by contrast-specific class).
T1_MEANS = {0: 7.0, 14: 44.4, 15: 44.4, 16: 129.8, 24: 44.4, 72: 44.4, 85: 160.3, 502: 126.4,
            506: 18.1, 507: 93.9, 508: 117.1, 509: 69.9, 511: 113.7, 512: 68.2, 514: 48.4,
            515: 30.2, 516: 94.2, 530: 144.5, 2: 160.3, 3: 96.3, 4: 44.4, 5: 44.4, 7: 136.0,
            8: 88.2, 10: 129.5, 11: 96.3, 12: 124.1, 13: 151.8, 17: 96.3, 18: 96.3, 25: 116.1,
            26: 96.3, 28: 142.5, 30: 86.8, 136: 59.6, 137: 59.6, 41: 160.3, 42: 96.3, 43: 44.4,
            44: 44.4, 46: 136.0, 47: 88.2, 49: 129.5, 50: 96.3, 51: 124.1, 52: 151.8, 53: 96.3,
            54: 96.3, 57: 116.1, 58: 96.3, 60: 142.5, 62: 86.8, 163: 59.6, 164: 59.6}
T1_MEANS_WM = 160.3

#: Generation labels given to the head outside the brain of a real subject, darkest first
#: (intensity clusters of its T1: the painter gives each its own random intensity).
HEAD_LABELS = (515, 509, 507, 530)

#: aseg labels that are not generation labels -> the generation label they become (corpus
#: callosum and WM hypointensities become the white matter of their side; see
#: :func:`subject_generation_labels`); 'WM' is the white matter of the voxel's side.
_ASEG_SPECIAL = {251: 'WM', 252: 'WM', 253: 'WM', 254: 'WM', 255: 'WM', 77: 'WM', 78: 2, 79: 41,
                 31: 4, 63: 43, 80: 'WM', 81: 'WM', 82: 'WM'}


def subject_generation_labels(t1, aseg, air=15.0):
    """Generation label map (int16) of a real subject: its aseg (labels that are not generation
    labels become their neighbours', the corpus callosum and hypointensities the white matter
    of their side), and outside the brain :data:`HEAD_LABELS` from a 1-D k-means of the T1
    intensities above ``air`` (darker voxels are background)."""
    aseg = np.asarray(aseg).astype(np.int32)
    t1 = np.asarray(t1, np.float32)
    out = aseg.copy()
    brain = ndimage.find_objects((aseg > 0).astype(np.int8))
    if brain:       # the distance transforms need only the brain's box (and a margin)
        box = tuple(slice(max(s.start - 4, 0), s.stop + 4) for s in brain[0])
        out[box] = _brain_generation_labels(aseg[box])
    head = (aseg == 0) & (t1 > air)
    if head.any():
        values = t1[head]
        centres = np.percentile(values, np.linspace(10, 90, len(HEAD_LABELS)))
        for _ in range(20):
            assign = np.argmin(np.abs(values[:, None] - centres[None]), axis=1)
            new = np.array([values[assign == k].mean() if (assign == k).any() else centres[k]
                            for k in range(len(centres))])
            if np.allclose(new, centres, atol=0.05):
                break
            centres = new
        order = np.argsort(centres)
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        out[head] = np.asarray(HEAD_LABELS)[rank[assign]]
    return out.astype(np.int16)


def _brain_generation_labels(aseg):
    """The generation labels of an aseg (see :func:`subject_generation_labels`)."""
    out = aseg.copy()
    wm = np.isin(out, [k for k, v in _ASEG_SPECIAL.items() if v == 'WM'])
    if wm.any():
        # the side of each voxel from the nearest lateralized white matter
        idx = ndimage.distance_transform_edt(~np.isin(aseg, (2, 41)), return_distances=False,
                                             return_indices=True)
        nearest = aseg[tuple(i[wm] for i in idx)]
        out[wm] = np.where(nearest == 41, 41, 2)
    for k, v in _ASEG_SPECIAL.items():
        if v != 'WM':
            out[aseg == k] = v
    unknown = ~np.isin(out, lab.GENERATION_LABELS)
    if unknown.any():
        idx = ndimage.distance_transform_edt(unknown, return_distances=False, return_indices=True)
        out[unknown] = out[tuple(i[unknown] for i in idx)]
    return out


def prior_contrast(t1, labels, sigma_mm=0.5):
    """A real T1 (FreeSurfer's scale, white matter 110) with the contrast of the rendered
    targets: each brain label's median brought to its :data:`T1_MEANS` (relative to white
    matter) by a gain, the gains smoothed (``sigma_mm``, voxels of 1 mm) so that partial-volume
    edges stay smooth; the head outside the brain (:data:`HEAD_LABELS`, background) unchanged.

    FreeSurfer's T1.mgz is normalized so that all white matter, cerebellar too, is 110, and its
    grey matter and fluid are brighter relative to it than in an MPRAGE (cortex about 0.72 of
    white matter against 0.60; the inferior lateral ventricles' voxels about 0.6): targets in
    that scale taught the network a contrast no MPRAGE has (correlation of its output with the
    real OASIS T1s 0.907; 0.951 after training on these: docs/mri_synthsr.md)."""
    t1 = np.asarray(t1, np.float32)
    labels = np.asarray(labels)
    gain = np.ones(t1.shape, np.float32)
    for k, mean in T1_MEANS.items():
        if k == 0 or k in HEAD_LABELS:
            continue
        m = labels == k
        if m.sum() < 8:
            continue
        median = float(np.median(t1[m]))
        if median > 1:
            gain[m] = WM_T1 * mean / T1_MEANS_WM / median
    if sigma_mm:
        gain = ndimage.gaussian_filter(gain, sigma_mm)
    return t1 * gain


def load_training_item(path, contrast='real'):
    """``(generation labels, T1 or None)`` of a bank entry: a label map file, or a FreeSurfer
    subject folder (``T1.mgz`` + ``aseg.mgz``), whose T1 comes as uint8 in FreeSurfer's scale
    (``contrast='prior'``: :func:`prior_contrast` of it)."""
    import nibabel as nib
    if not os.path.isdir(path):
        return gen.load_label_map(path)
    t1 = nib.load(os.path.join(path, 'T1.mgz'))
    aseg = nib.load(os.path.join(path, 'aseg.mgz'))
    if t1.shape != aseg.shape or not np.allclose(t1.affine, aseg.affine, atol=1e-3):
        raise ValueError('%s: T1.mgz and aseg.mgz are not on one grid' % path)
    t1 = np.asarray(t1.dataobj)
    labels = subject_generation_labels(t1, np.asarray(aseg.dataobj))
    if contrast == 'prior':
        t1 = prior_contrast(t1, labels)
    elif contrast != 'real':
        raise ValueError("target contrast must be 'real' or 'prior', got %r" % (contrast,))
    return labels, np.clip(np.rint(t1), 0, 255).astype(np.uint8)


def render_t1(labels, rng, variation=0.06, gain_std=0.04, blur_mm=0.5):
    """A T1 (in units of white matter) rendered from generation labels (X, Y, Z): each label's
    typical MPRAGE intensity with a random gain (``gain_std``), times a smooth random field of
    about ``variation`` relative amplitude (within-structure variation), lightly blurred
    (``blur_mm``, partial volume)."""
    table = np.zeros(1024, np.float32)
    for k, v in T1_MEANS.items():
        table[k] = v / T1_MEANS_WM
    table *= rng.normal(1.0, gain_std, table.shape).astype(np.float32)
    t1 = table[np.asarray(labels)]
    coarse = rng.normal(0.0, variation, [max(2, n // 16) for n in t1.shape]).astype(np.float32)
    field = ndimage.zoom(coarse, [n / c for n, c in zip(t1.shape, coarse.shape)], order=3)
    t1 *= np.exp(field[tuple(slice(0, n) for n in t1.shape)])
    return ndimage.gaussian_filter(t1, blur_mm) if blur_mm else t1


class ImageStatisticsNorm(keras.layers.BatchNormalization):
    """Batch normalization that always uses the statistics of its input and never updates its
    moving averages (what our SynthSeg network does at inference, ``norm_statistics: image``),
    also when frozen. Same weights as :class:`keras.layers.BatchNormalization`."""

    def call(self, inputs, training=None, mask=None):
        x = ops.cast(inputs, 'float32')
        mean, variance = self._moments(x, mask)
        out = ops.batch_normalization(x, mean, variance, axis=self.axis, offset=self.beta,
                                      scale=self.gamma, epsilon=self.epsilon)
        return ops.cast(out, self.compute_dtype)


def frozen_segmenter(prefix, name='frozen_synthseg'):
    """The SynthSeg network of ``PREFIX.weights.h5`` / ``PREFIX.json`` as a frozen Keras model
    (its batch norm on each input's statistics when its card says so)."""
    import json
    with open(prefix + '.json') as f:
        card = json.load(f)
    cfg = nets.UNetConfig.from_dict(card['architecture'])
    model = nets.unet(cfg, name=name)
    nets.load_weights(model, prefix + '.weights.h5')
    if card.get('input', {}).get('norm_statistics') == 'image':
        _image_statistics(model)
    model.trainable = False
    return model, card


class MinMax(keras.layers.Layer):
    """Per-example min-max normalization to [0, 1] (what the segmenter's input looks like)."""

    def call(self, x):
        axes = tuple(range(1, len(x.shape)))
        lo = ops.min(x, axis=axes, keepdims=True)
        hi = ops.max(x, axis=axes, keepdims=True)
        return (x - lo) / (hi - lo + 1e-6)


class L1Loss(keras.losses.Loss):
    """Mean absolute error."""

    def __init__(self, name='l1', **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        return ops.mean(ops.abs(y_pred - y_true), axis=tuple(range(1, len(y_pred.shape))))


class SoftDiceLoss(keras.losses.Loss):
    """Soft Dice of (soft) one-hot targets."""

    def __init__(self, name='soft_dice', **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        return losses.soft_dice_loss(y_true, y_pred)


def _smooth_upsampled(x, axes=(1, 2, 3)):
    """Nearest-neighbour 2x upsampled posteriors made trilinear: [1/4, 1/2, 1/4] along each
    axis (edges repeated); exactly the trilinear interpolation between the 2 mm voxel centres."""
    for ax in axes:
        def part(sl):
            return x[(slice(None),) * ax + (sl,)]
        before = ops.concatenate([part(slice(0, 1)), part(slice(None, -1))], axis=ax)
        after = ops.concatenate([part(slice(1, None)), part(slice(-1, None))], axis=ax)
        x = 0.5 * x + 0.25 * (before + after)
    return x


class RefinedPosteriors(keras.layers.Layer):
    """What ``mri_synthseg``'s pipeline gives SynthSR at inference, made in the training graph:
    the segmenter's 2 mm posteriors brought to 1 mm trilinearly and sharpened by a Gaussian
    intensity model of each label fitted to the example (the training-time twin of
    :class:`synthkit.models.synthseg.inference.IntensityModel`: fitted on the 2 mm grid over
    voxels of posterior above ``threshold``, brain labels renormalized to the network's brain
    probability, background kept, ``shared`` labels taking another's Gaussian).

    Inputs: the 1 mm image (B, X, Y, Z, 1), the 2 mm image (B, x, y, z, 1) and posteriors
    (B, x, y, z, C) the intensity model is fitted on, and the 2 mm posteriors to bring to 1 mm:
    those of the 1 mm image's region (B, X/2, Y/2, Z/2, C; edges repeated), or with ``margin``
    those and one 2 mm voxel around them (B, X/2 + 2, ..., C; cropped after the
    interpolation)."""

    def __init__(self, bg=0, shared=None, threshold=0.5, min_weight=4.0, min_std=0.05,
                 **kwargs):
        super().__init__(**kwargs)
        self.bg, self.threshold, self.min_weight, self.min_std = bg, threshold, min_weight, \
            min_std
        self.shared = {int(k): int(v) for k, v in (shared or {}).items()}

    def get_config(self):
        return {**super().get_config(), 'bg': self.bg, 'shared': self.shared,
                'threshold': self.threshold, 'min_weight': self.min_weight,
                'min_std': self.min_std}

    def call(self, inputs, margin=False):
        image, low, fit_post, post = [ops.cast(t, 'float32') for t in inputs]
        channels = fit_post.shape[-1]
        w = ops.where(fit_post > self.threshold, fit_post, 0.0)
        n = ops.sum(w, axis=(1, 2, 3))                              # (B, C)
        s1 = ops.sum(w * low, axis=(1, 2, 3))
        s2 = ops.sum(w * low * low, axis=(1, 2, 3))
        if self.shared:
            index = [self.shared.get(c, c) for c in range(channels)]
            n, s1, s2 = (ops.take(t, index, axis=1) for t in (n, s1, s2))
        not_bg = np.ones(channels, np.float32)
        not_bg[self.bg] = 0
        fitted = ops.cast(n >= self.min_weight, 'float32') * not_bg
        mean = s1 / ops.maximum(n, 1e-12)
        var = ops.maximum(s2 / ops.maximum(n, 1e-12) - mean ** 2, self.min_std ** 2)
        var = ops.where(fitted > 0, var, 1.0)
        up = ops.repeat(ops.repeat(ops.repeat(post, 2, axis=1), 2, axis=2), 2, axis=3)
        up = _smooth_upsampled(up)
        if margin:
            up = up[:, 2:-2, 2:-2, 2:-2]
        b = lambda t: t[:, None, None, None, :]                     # noqa: E731
        loglik = -0.5 * (image - b(mean)) ** 2 / b(var) - 0.5 * ops.log(b(var))
        fit_b = b(fitted)
        count = ops.maximum(ops.sum(fitted, axis=-1), 1.0)[:, None, None, None, None]
        average = ops.sum(loglik * fit_b, axis=-1, keepdims=True) / count
        loglik = ops.where(fit_b > 0, loglik, average)
        loglik = ops.where(ops.convert_to_tensor(not_bg) > 0, loglik, -1e30)
        loglik = loglik - ops.max(loglik, axis=-1, keepdims=True)
        lik = ops.exp(loglik) * up
        bg = up[..., self.bg:self.bg + 1]
        total = ops.sum(lik, axis=-1, keepdims=True)
        refined = lik * (1.0 - bg) / ops.maximum(total, 1e-20)
        refined = ops.where(total > 1e-20, refined, up)
        is_bg = np.zeros(channels, np.float32)
        is_bg[self.bg] = 1
        refined = refined * (1.0 - is_bg) + up * is_bg
        any_fit = ops.cast(ops.sum(fitted, axis=-1) > 0, 'float32')[:, None, None, None, None]
        inside = ops.cast(bg < 1 - 1e-6, 'float32')
        keep = any_fit * inside
        return refined * keep + up * (1.0 - keep)


CUSTOM_OBJECTS = {'ImageStatisticsNorm': ImageStatisticsNorm, 'MinMax': MinMax,
                  'L1Loss': L1Loss, 'SoftDiceLoss': SoftDiceLoss,
                  'RefinedPosteriors': RefinedPosteriors}


def refined_posteriors_layer(name='posteriors_refined'):
    """:class:`RefinedPosteriors` with mri_synthseg's settings (its
    :meth:`IntensityModel.for_labels`: e.g. the inferior lateral ventricles take the lateral
    ventricles' Gaussian)."""
    from ..synthseg.inference import IntensityModel
    model = IntensityModel.for_labels(lab.SEGMENTATION_LABELS)
    return RefinedPosteriors(bg=model.bg, shared=model.shared, threshold=model.threshold,
                             min_weight=model.min_weight, min_std=model.min_std, name=name)


def centre_posteriors(net, centre, low, post, margins):
    """The hybrid network ``net``'s 2 mm posteriors ``post`` (of the image whose 2 mm version
    is ``low``) on the 1 mm grid of its ``centre`` (the 1 mm image cropped by ``margins``
    voxels, even, on each side): nearest-neighbour repeats, or, when ``net`` has a
    :class:`RefinedPosteriors` layer, refined ones."""
    try:
        refine = net.get_layer('posteriors_refined')
    except ValueError:
        return keras.layers.Cropping3D(tuple((m, m) for m in margins),
                                       name='centre_crop_posteriors')(
            net.get_layer('posteriors_to_1mm')(post))
    region = keras.layers.Cropping3D(tuple((m // 2 - 1, m // 2 - 1) for m in margins),
                                     name='centre_crop_posteriors')(post)
    return refine([centre, low, post, region], margin=True)


def hybrid_network(cfg, segmenter, name='synthsr_unet', refine=False):
    """The SR network fed with the frozen SynthSeg's view of its input too: the image and the
    33 posteriors of ``segmenter`` on it (at 2 mm, back to 1 mm by nearest neighbour) go into a
    U-Net of ``cfg`` (whose ``in_channels`` must be 34). The posteriors are contrast-invariant
    from the first step, so the U-Net learns to render a T1 from them rather than to segment
    from scratch. Inputs must be multiples of 2x the segmenter's divisor. ``refine``: the
    posteriors come to 1 mm as mri_synthseg's pipeline gives them (:class:`RefinedPosteriors`;
    edges repeated)."""
    inp = keras.Input((None, None, None, 1), name='image')
    low = keras.layers.AveragePooling3D(2, name='input_to_2mm')(inp)
    post = segmenter(MinMax(name='input_minmax')(low))
    if refine:
        up = refined_posteriors_layer()([inp, low, post, post])
    else:
        up = keras.layers.UpSampling3D(2, name='posteriors_to_1mm')(post)
    x = keras.layers.Concatenate(name='image_and_posteriors')([inp, up])
    out = nets.unet(cfg, name='sr_core')(x)
    return keras.Model(inp, out, name=name)


def load_hybrid(weights, architecture, precision='float32'):
    """The exported hybrid network of a model card's ``architecture`` (type
    ``synthsr_hybrid``) with ``weights``: (model, input divisor). ``precision``: the Keras
    dtype policy it computes in (weights stay float32)."""
    seg_cfg = nets.UNetConfig.from_dict(architecture['segmenter'])
    with backend.dtype_policy(precision):
        seg = nets.unet(seg_cfg, name='frozen_synthseg')
        if architecture.get('segmenter_norm_statistics') == 'image':
            _image_statistics(seg)       # before loading: the weights file names the classes
        model = hybrid_network(nets.UNetConfig.from_dict(architecture['unet']), seg,
                               refine=bool(architecture.get('refine_input')))
    nets.load_weights(model, weights)
    return model, 2 * seg_cfg.divisor


def replace_segmenter(path, seg_prefix, out=None):
    """Put the SynthSeg network of ``seg_prefix`` (``.weights.h5`` + ``.json``) into a SynthSR
    hybrid, keeping its U-Net: an exported ``PREFIX.weights.h5`` (with its card ``PREFIX.json``,
    which records the segmenter's source) or a training checkpoint ``.keras`` (the network's
    segmenter and the loss term's), written to ``out`` (default: in place), atomically.

    The U-Net renders the T1 from the segmenter's posteriors, so a better-trained SynthSeg gives
    a better T1 without retraining (2026-12-06: OASIS SR-then-segment 0.749 -> 0.761, ixi002
    T2 0.729 -> 0.811, docs/mri_synthsr.md). The two networks must have one architecture.
    Returns the segmenter's card."""
    import json
    seg, seg_card = frozen_segmenter(seg_prefix)
    out = out or path
    if path.endswith('.keras'):
        model = keras.models.load_model(path, custom_objects=CUSTOM_OBJECTS)
        names = [layer.name for layer in model.layers]
        parts = [n for n in ('frozen_synthseg', 'loss_synthseg') if n in names]
        if 'frozen_synthseg' not in parts:
            raise ValueError('%s is not a checkpoint of the hybrid SynthSR network' % path)
        for name in parts:
            _same_shapes(model.get_layer(name), seg, path, seg_prefix)
            model.get_layer(name).set_weights(seg.get_weights())
        tmp = out + '.tmp.keras'
        model.save(tmp)
        os.replace(tmp, out)
        return seg_card
    if not path.endswith('.weights.h5'):
        raise ValueError('expected a .weights.h5 export or a .keras checkpoint, got %s' % path)
    if not out.endswith('.weights.h5'):
        raise ValueError('the output of an export must end in .weights.h5, got %s' % out)
    with open(path[:-len('.weights.h5')] + '.json') as f:
        card = json.load(f)
    if card.get('architecture', {}).get('type') != 'synthsr_hybrid':
        raise ValueError('%s is not a hybrid SynthSR network (card architecture %r)'
                         % (path, card.get('architecture', {}).get('type')))
    if (nets.UNetConfig.from_dict(card['architecture']['segmenter'])
            != nets.UNetConfig.from_dict(seg_card['architecture'])):
        raise ValueError('the SynthSeg network of %s differs in architecture from the one '
                         'inside %s' % (seg_prefix, path))
    model, _ = load_hybrid(path, card['architecture'])
    model.get_layer('frozen_synthseg').set_weights(seg.get_weights())
    tmp = out[:-len('.weights.h5')] + '.tmp.weights.h5'
    model.save_weights(tmp)
    card.setdefault('training', {})['segmenter'] = {
        'weights': os.path.basename(seg_prefix) + '.weights.h5',
        'steps': seg_card.get('training', {}).get('steps')}
    card_tmp = out[:-len('.weights.h5')] + '.json.tmp'
    with open(card_tmp, 'w') as f:
        json.dump(card, f, indent=2)
    os.replace(tmp, out)
    os.replace(card_tmp, out[:-len('.weights.h5')] + '.json')
    return seg_card


def _same_shapes(layer, seg, path, seg_prefix):
    a = [tuple(w.shape) for w in layer.weights]
    b = [tuple(w.shape) for w in seg.weights]
    if a != b:
        raise ValueError('the SynthSeg network of %s differs in architecture from the one '
                         'inside %s' % (seg_prefix, path))


def _image_statistics(model):
    """Make the batch norm layers of ``model`` :class:`ImageStatisticsNorm` (Keras weights
    files name the classes: swap after loading a SynthSeg file, before loading a file saved
    with the swapped classes)."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.__class__ = ImageStatisticsNorm


@dataclasses.dataclass
class SROptions(Options):
    seg_weight: float = 0.25       # weight of the Dice of the frozen SynthSeg on the prediction
    seg_model: str = 'models/synthseg'   # its weights prefix (inside checkpoints once trained)
    real_fraction: float = 0.5     # share of examples from real-T1 subjects (if the bank has both)
    seg_input: bool = False        # feed the frozen SynthSeg's posteriors of the input too
    # with seg_input: the U-Net trains on the centre crop^3 of each example (cfg.shape) while the
    # segmenter sees the whole example, as it sees the whole scan at inference (0: no crop)
    crop: int = 0
    # with seg_input: the U-Net is fed the posteriors as mri_synthseg's pipeline gives them at
    # inference (1 mm, sharpened by the example's own intensity model: RefinedPosteriors), not
    # the segmenter's 2 mm ones repeated
    refine_input: bool = False
    # the real subjects' T1 targets: 'real' (FreeSurfer's T1.mgz as it is) or 'prior' (each
    # brain label's median brought to the rendered targets' MPRAGE contrast: prior_contrast)
    real_contrast: str = 'real'


class SRTask(Task):
    """Target: the 1 mm T1 (units of white matter) of the deformed anatomy; loss: L1 + Dice of
    the frozen SynthSeg's segmentation of the prediction; score: correlation of prediction and
    target over the head."""
    name = 'synthsr'
    Options = SROptions
    custom_objects = CUSTOM_OBJECTS
    # no normalization layers: with one image per batch, batch norm either uses moving averages
    # that fit no image at inference, or each tile's own statistics, which show as seams between
    # the tiles of a smooth image (the first 270 steps, with batch norm, validated at -0.11)
    choose_norm_statistics = False

    def __init__(self, cfg):
        super().__init__(cfg)
        # the SR network is a layer of the training model when the SynthSeg term is on
        self.network_layer = 'synthsr_unet' if self.opts.seg_weight or self.opts.seg_input \
            else None
        self._segmenter = None
        self.seg_lookup = lab.generation_lookup(lab.SEGMENTATION_LABELS)
        self.n_seg = len(lab.SEGMENTATION_LABELS)

    @classmethod
    def preset(cls, maps):
        """Training maps: the whole-head label maps (rendered targets) and the real-T1 FreeSurfer
        subjects of ``fs_subjects/`` beside their folder; the last of each, sorted, is held out."""
        maps = sorted(maps)
        subjects = subjects_beside(maps, ('T1.mgz', 'aseg.mgz'))
        if len(maps) < 2:
            raise ValueError('need at least 2 label maps, got %d' % len(maps))
        val = [maps[-1]] + subjects[-1:]
        train = maps[:-1] + subjects[:-1]
        return TrainConfig(
            # 160^3 examples: the segmenter sees a whole head (crop mode), the U-Net their centre
            label_maps=train, val_maps=val, task=cls.name, shape=(160, 160, 160),
            unet=nets.UNetConfig(out_channels=1, final_activation='linear',
                                 norm=None).to_dict(),
            generator={'voxsize_mm': 1.0, 'translation_range_mm': (-50.0, 50.0),
                       'strip_prob': 0.1, 'fov_prob': 0.05,
                       'isotropic_range_mm': (1.0, 3.0), 'anisotropic_range_mm': (2.0, 8.0),
                       'anisotropic_prob': 0.7, 'noise_std_max': 0.03},
            # 3e-4 and seg_weight 0.25 trained the first 6700 steps; then 1e-4 and 0.5 (the
            # measure is segmenting the output): 6700 -> 7885 raised every version's
            # SR-then-segment Dice by 0.001-0.004 (docs/mri_synthsr.md)
            val_pairs=4, val_every=100, learning_rate=1e-4,
            # the hybrid network: 0.46-0.52 validation correlation at 400-800 steps against
            # the plain network's 0.20-0.28 (and negative at times) at 100-500; crop mode: the
            # segmenter's labels of 80 mm examples agree with its whole-head ones at Dice
            # 0.11-0.19, and 1163 steps in crop mode raised SR-then-segment OASIS Dice
            # 0.734 -> 0.749 (docs/mri_synthsr.md); refine_input: 1409 steps raised it (with
            # mri_synthsr's refined posteriors) 0.793 -> 0.821; real_contrast 'prior': 1703
            # steps raised the correlation with the real OASIS T1s 0.907 -> 0.951, Dice
            # 0.821 -> 0.823
            task_options={'seg_input': True, 'crop': 80, 'refine_input': True,
                          'real_contrast': 'prior', 'seg_weight': 0.5})

    # ------------------------------------------------------------------------------- model
    def segmenter(self):
        """(frozen SynthSeg, its card), loaded once per task."""
        if self._segmenter is None:
            self._segmenter = frozen_segmenter(self.opts.seg_model)
        return self._segmenter

    def core_config(self):
        """The U-Net of the SR network (34 input channels when fed the posteriors)."""
        cfg = nets.UNetConfig.from_dict(self.cfg.unet)
        if self.opts.seg_input:
            cfg.in_channels = 1 + self.n_seg
        return cfg

    def network(self):
        if self.opts.seg_input:
            return hybrid_network(self.core_config(), self.segmenter()[0],
                                  refine=self.opts.refine_input)
        return nets.unet(self.core_config(), name='synthsr_unet')

    def architecture(self):
        if not self.opts.seg_input:
            return super().architecture()
        seg_card = self.segmenter()[1]
        arch = {'type': 'synthsr_hybrid', 'unet': self.core_config().to_dict(),
                'segmenter': seg_card['architecture'],
                'segmenter_norm_statistics': seg_card.get('input', {}).get('norm_statistics')}
        if self.opts.refine_input:
            arch['refine_input'] = True
        return arch

    def _margins(self):
        """Voxels cropped from each side of an example for the U-Net (crop mode): even, so that
        the crop's 2 mm grid is the segmenter's."""
        margins = tuple((int(n) - self.opts.crop) // 2 for n in self.cfg.shape)
        if any(m < 0 or m % 2 or int(n) - self.opts.crop != 2 * m
               for m, n in zip(margins, self.cfg.shape)):
            raise ValueError('task option crop=%d: the example shape %s must exceed it by a '
                             'multiple of 4 voxels along each axis'
                             % (self.opts.crop, tuple(self.cfg.shape)))
        return margins

    def _crop_model(self):
        """Crop mode's training model: the hybrid network's layers with the U-Net on the centre
        crop of the example's image and posteriors; with ``seg_weight``, the frozen SynthSeg
        of the loss sees the prediction pasted into the example's target T1 (the input
        'context', its centre zeroed), so it too segments a whole head, not a crop."""
        net = self.network()
        margins = self._margins()
        image = keras.Input((None, None, None, 1), name='image')
        low = net.get_layer('input_to_2mm')(image)
        post = net.get_layer('frozen_synthseg')(net.get_layer('input_minmax')(low))
        centre = keras.layers.Cropping3D(tuple((m, m) for m in margins), name='centre_crop')(
            image)
        both = keras.layers.Concatenate(name='centre_inputs')([centre, centre_posteriors(
            net, centre, low, post, margins)])
        sr = net.get_layer('sr_core')(both)
        if not self.opts.seg_weight:
            return keras.Model(image, sr, name='synthsr_training')
        context = keras.Input((None, None, None, 1), name='context')
        pasted = keras.layers.Add(name='paste')([keras.layers.ZeroPadding3D(
            tuple((m, m) for m in margins), name='to_context')(keras.layers.ReLU()(sr)), context])
        seg, _ = frozen_segmenter(self.opts.seg_model, name='loss_synthseg')
        low = keras.layers.AveragePooling3D(2, name='to_2mm')(pasted)
        post = keras.layers.Cropping3D(tuple((m // 2, m // 2) for m in margins),
                                       name='centre_crop_2mm')(seg(MinMax(name='minmax')(low)))
        return keras.Model([image, context], [sr, post], name='synthsr_training')

    def training_model(self):
        if self.opts.crop:
            return self._crop_model()
        net = self.network()
        if not self.opts.seg_weight:
            return net
        # its own copy for the loss term (a layer shared by the network and the training model
        # would not survive a checkpoint's save and load as one)
        seg, _ = frozen_segmenter(self.opts.seg_model)
        inp = keras.Input((None, None, None, 1), name='image')
        sr = net(inp)
        low = keras.layers.AveragePooling3D(2, name='to_2mm')(keras.layers.ReLU()(sr))
        post = seg(MinMax(name='minmax')(low))
        return keras.Model(inp, [sr, post], name='synthsr_training')

    def build_model(self):
        model = self.training_model()
        if self.opts.seg_weight:
            model.compile(optimizer=keras.optimizers.Adam(self.cfg.learning_rate),
                          loss=[L1Loss(), SoftDiceLoss()],
                          loss_weights=[1.0, float(self.opts.seg_weight)])
        else:
            model.compile(optimizer=keras.optimizers.Adam(self.cfg.learning_rate), loss=L1Loss())
        return model

    def bare(self, model):
        """The SR network inside a training model (or the model itself); crop mode: a hybrid
        network with the training model's segmenter and U-Net weights."""
        if self.opts.crop:
            return self.exported_network(model)
        try:
            return model.get_layer(self.network_layer)
        except ValueError:
            return model

    def exported_network(self, model):
        self._segmenter = None       # a fresh segmenter: the trained one belongs to ``model``
        bare = self.network()
        if self.opts.crop:
            _copy_parts(model, bare)
            return bare
        bare.set_weights(self.bare(model).get_weights())
        return bare

    def load_init(self, model, weights, card=None):
        if not self.opts.crop:
            return super().load_init(model, weights, card)
        hybrid = self.network()
        nets.load_weights(hybrid, weights)
        _copy_parts(hybrid, model)

    # -------------------------------------------------------------------------------- data
    def make_bank(self, paths):
        return gen.LabelMapBank([resolve_subject(p) for p in paths],
                                loader=functools.partial(load_training_item,
                                                         contrast=self.opts.real_contrast))

    def sample(self, sampler, bank, rng, n):
        real = [i for i, im in enumerate(bank.images) if im is not None]
        rendered = [i for i, im in enumerate(bank.images) if im is None]
        if real and rendered:
            idx = [rng.choice(real) if rng.random() < self.opts.real_fraction
                   else rng.choice(rendered) for _ in range(n)]
        else:
            idx = rng.integers(0, len(bank), size=n)
        maps, idx = bank.batch(n, rng, indices=idx)
        out = sampler(maps)
        image = np.asarray(out['image'])
        labels = np.asarray(out['labels'])[..., 0]
        coords = np.asarray(out['coords'])
        fov = np.asarray(out['fov'])[..., 0] if 'fov' in out else None
        targets = []
        for b, i in enumerate(idx):
            if bank.images[i] is not None:
                t1 = ndimage.map_coordinates(bank.images[i].astype(np.float32),
                                             np.moveaxis(coords[b], -1, 0), order=1,
                                             mode='constant') / WM_T1
            else:
                t1 = render_t1(labels[b], rng)
            if _stripped(image[b, ..., 0], labels[b]):
                t1 = t1 * np.isin(labels[b], lab.BRAIN_LABELS + (24,))
            if fov is not None:
                t1 = t1 * fov[b]
            targets.append(t1.astype(np.float32))
        seg = self.seg_lookup[labels].astype(np.uint8)
        return image, (np.stack(targets)[..., None], seg)

    def _centre(self, x):
        """The centre crop (crop mode) of arrays (B, X, Y, Z, ...)."""
        return x[(slice(None),) + tuple(slice(m, m + self.opts.crop) for m in self._margins())]

    def prepare(self, x):
        if not (self.opts.crop and self.opts.seg_weight):
            return x
        image, t1 = x
        context = np.array(t1, np.float32)
        self._centre(context)[...] = 0          # a view: the centre of the copy
        return [image, context]

    def batch(self, sampler, bank, rng, n, raw=False):
        x, t = self.sample(sampler, bank, rng, n)
        if self.opts.crop and self.opts.seg_weight:
            x = (x, t[0])          # the target T1 around the crop is the loss's context
        return (x, t) if raw else (self.prepare(x), t)

    def encode(self, target):
        t1, seg = target
        if self.opts.crop:
            t1, seg = self._centre(t1), self._centre(seg)
        if not self.opts.seg_weight:
            return t1
        onehot = ops.one_hot(ops.convert_to_tensor(seg, 'int32'), self.n_seg)
        return [t1, ops.average_pool(onehot, 2, 2)]

    def validation_set(self):
        """One fixed synthetic example per held-out entry and draw: ``val_pairs`` in all, taken
        in turn from the held-out maps (a rendered-target map and a real-T1 subject)."""
        if not self.cfg.val_maps:
            return None
        bank = self.make_bank(self.cfg.val_maps)
        sampler, _ = self.stream(10 ** 7)
        rng = np.random.default_rng(12345)
        pairs = []
        for k in range(self.cfg.val_pairs):
            single = _OneEntry(bank, k % len(bank))
            x, t = self.sample(sampler, single, rng, 1)
            pairs.append((x, t))
        return pairs

    def score(self, pred, target):
        """Correlation of prediction and target T1 over the voxels where either is non-zero."""
        t1 = target[0] if isinstance(target, tuple) else target
        p, t = np.asarray(pred)[..., 0].ravel(), np.asarray(t1)[..., 0].ravel()
        keep = (np.abs(t) > 1e-3) | (np.abs(p) > 1e-3)
        if keep.sum() < 2 or np.std(p[keep]) == 0 or np.std(t[keep]) == 0:
            return 0.0
        return float(np.corrcoef(p[keep], t[keep])[0, 1])

    def validate(self, model, pairs):
        net = self.bare(model) if isinstance(model, keras.Model) else model
        return float(np.mean([self.score(np.asarray(net.predict_on_batch(x)), t)
                              for x, t in pairs]))

    # -------------------------------------------------------------------------- model card
    def output_labels(self):
        return None

    def loss_description(self):
        text = 'L1 to the target T1 (units of white matter)'
        if self.opts.seg_weight:
            text += ' + %.2g x soft Dice of the frozen SynthSeg (%s) on the prediction' % (
                self.opts.seg_weight, self.opts.seg_model)
        return text + '; validation score: correlation with the target T1'


def _copy_parts(source, target):
    """The weights of the hybrid network's two parts (frozen segmenter, U-Net) from one model
    holding them to another (crop mode's training model and the shipped hybrid)."""
    for name in ('frozen_synthseg', 'sr_core'):
        target.get_layer(name).set_weights(source.get_layer(name).get_weights())


def _stripped(image, labels, dark=0.01):
    """Whether the generator painted everything outside the brain black (``strip_prob``): the
    labelled voxels outside the brain and CSF, away from its edge, are nearly all dark."""
    outside = (labels > 0) & ~np.isin(labels, lab.BRAIN_LABELS + (24,))
    outside &= ~ndimage.binary_dilation(~outside, iterations=4)
    if outside.sum() < 100:
        return False
    return float((image[outside] < dark).mean()) > 0.95


class _OneEntry:
    """A view of one entry of a bank (what :meth:`SRTask.sample` draws from)."""

    def __init__(self, bank, i):
        self.bank, self.i = bank, i
        self.images = [bank.images[i]]

    def __len__(self):
        return 1

    def batch(self, n, rng, indices=None):
        return self.bank.batch(n, rng, indices=[self.i] * n)[0], np.zeros(n, int)


#: the low-field regime of :class:`LowFieldSRTask` (over :meth:`SRTask.preset`'s generator):
#: portable low-field scanners give about 1.5 x 1.5 x 5 mm, low SNR, weak contrast. Every
#: example is at a simulated lower resolution, 80 % of them thick-slice (3-7 mm, 1.2-2 mm in
#: plane); the per-label noise (GMM standard deviations 5-45 against 0-30) and the white noise
#: (up to 10) come before the slice blur, so they partly average out, as thermal noise does
#: over a thick voxel
LOWFIELD_GENERATOR = {'isotropic_range_mm': (1.5, 3.5), 'anisotropic_range_mm': (3.0, 7.0),
                      'anisotropic_inplane_range_mm': (1.2, 2.0), 'anisotropic_prob': 0.8,
                      'std_range': (5.0, 45.0), 'noise_std_max': 10.0, 'resolution_prob': 1.0}


class LowFieldSRTask(SRTask):
    """:class:`SRTask` on low-field-like inputs (``mri_synthsr --lowfield``): the same targets,
    network and loss, the generator biased to :data:`LOWFIELD_GENERATOR`; trained from the
    standard model's weights (``--init models/synthsr``)."""
    name = 'synthsr_lowfield'

    @classmethod
    def preset(cls, maps):
        cfg = super().preset(maps)
        cfg.task = cls.name
        cfg.generator = {**cfg.generator, **LOWFIELD_GENERATOR}
        return cfg
