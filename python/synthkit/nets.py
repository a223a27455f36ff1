"""Network definitions shared by every tool.

:func:`unet` builds the configurable 3-D U-Net of the SynthSeg/SynthStrip family; a
:class:`UNetConfig` describes it so a model card can record it and a tool can rebuild it before
loading weights.

Keras is imported by the functions that build networks, not by this module (:class:`UNetConfig`
serves :mod:`synthkit.runtime` without TensorFlow's import).
"""

import dataclasses

import numpy as np


@dataclasses.dataclass
class UNetConfig:
    """3-D U-Net hyper-parameters.

    ``features`` at the top level, multiplied by ``feature_mult`` at each level down;
    ``levels`` resolution levels (the input shape must be divisible by 2**(levels-1));
    ``convs_per_level`` 3x3x3 convolutions per level on each side; ``norm`` is 'batch', 'layer',
    'instance' (each channel over each image's voxels: no dependence on the batch, nor on moving
    averages; the choice to try for a model trained from scratch), or None;
    ``final_activation`` 'softmax' (segmentation) or 'linear' (regression).
    """
    in_channels: int = 1
    out_channels: int = 33
    features: int = 16
    feature_mult: int = 2
    levels: int = 4
    convs_per_level: int = 2
    activation: str = 'elu'
    norm: str = 'batch'
    final_activation: str = 'softmax'

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """From a dict of fields, e.g. a model card's ``architecture`` (its ``type`` key, which
        names the network kind, is not a field)."""
        return cls(**{k: v for k, v in values.items() if k != 'type'})

    @property
    def divisor(self):
        """Input sizes must be multiples of this."""
        return 2 ** (self.levels - 1)


def _norm(kind, name):
    from keras import layers
    if kind == 'batch':
        return layers.BatchNormalization(name=name)
    if kind == 'layer':
        return layers.LayerNormalization(name=name)
    if kind == 'instance':
        return layers.GroupNormalization(groups=-1, name=name)
    if kind in (None, 'none'):
        return None
    raise ValueError('unknown normalization %r' % kind)


def _conv_block(x, feats, cfg, name):
    from keras import layers
    for i in range(cfg.convs_per_level):
        x = layers.Conv3D(feats, 3, padding='same', name='%s_conv%d' % (name, i))(x)
        x = layers.Activation(cfg.activation, name='%s_act%d' % (name, i))(x)
    norm = _norm(cfg.norm, '%s_norm' % name)
    return norm(x) if norm is not None else x


def unet(cfg=None, shape=(None, None, None), name='unet'):
    """Build a 3-D U-Net: (B, X, Y, Z, in_channels) -> (B, X, Y, Z, out_channels)."""
    import keras
    from keras import layers
    cfg = cfg or UNetConfig()
    inp = keras.Input((*shape, cfg.in_channels), name='image')
    x, skips = inp, []
    for level in range(cfg.levels):
        feats = cfg.features * cfg.feature_mult ** level
        x = _conv_block(x, feats, cfg, 'enc%d' % level)
        if level < cfg.levels - 1:
            skips.append(x)
            x = layers.MaxPooling3D(2, name='pool%d' % level)(x)
    for level in reversed(range(cfg.levels - 1)):
        feats = cfg.features * cfg.feature_mult ** level
        x = layers.UpSampling3D(2, name='up%d' % level)(x)
        x = layers.Concatenate(name='skip%d' % level)([x, skips[level]])
        x = _conv_block(x, feats, cfg, 'dec%d' % level)
    # the head in float32 also under a mixed-precision policy (trainer.dtype_policy): softmax
    # and a regression output keep their precision (bfloat16 has 8 bits of mantissa)
    out = layers.Conv3D(cfg.out_channels, 1, activation=cfg.final_activation, name='head',
                        dtype='float32')(x)
    return keras.Model(inp, out, name=name)


def widen(narrow, wide, narrow_cfg, wide_cfg):
    """Copy the weights of U-Net ``narrow`` into the wider U-Net ``wide`` (same levels, convs
    per level, feature multiplier, normalization and channels; ``wide_cfg.features`` at least
    ``narrow_cfg.features``) so that ``wide`` computes exactly the function of ``narrow``.

    Each layer's old channels take the old weights; the added channels keep ``wide``'s fresh
    random weights on their inputs, and their weights into the old channels (and the head) are
    zero: they contribute nothing until training moves those weights, then add capacity to a
    trained network (function-preserving widening, as Net2Net) instead of starting over."""
    from keras import layers
    same = ('in_channels', 'out_channels', 'feature_mult', 'levels', 'convs_per_level',
            'activation', 'norm', 'final_activation')
    for key in same:
        if getattr(narrow_cfg, key) != getattr(wide_cfg, key):
            raise ValueError('cannot widen: %s differs (%r, %r)' % (
                key, getattr(narrow_cfg, key), getattr(wide_cfg, key)))
    if wide_cfg.features < narrow_cfg.features:
        raise ValueError('cannot widen from %d to %d features'
                         % (narrow_cfg.features, wide_cfg.features))

    def feats(cfg, level):
        return cfg.features * cfg.feature_mult ** level

    def old_inputs(name, n_old):
        """Positions in the wide layer's input of the narrow layer's n_old input channels."""
        kind, _, rest = name.partition('_')
        if kind.startswith('dec') and rest == 'conv0':      # [upsampled deeper, skip]
            level = int(kind[3:])
            below = (feats(narrow_cfg, level + 1), feats(wide_cfg, level + 1))
            return list(range(below[0])) + [below[1] + i for i in range(n_old - below[0])]
        return list(range(n_old))        # the image, or the previous layer's first channels

    for layer in wide.layers:
        old_layer = narrow.get_layer(layer.name)
        old = old_layer.get_weights()
        if not old:
            continue
        new = layer.get_weights()
        if isinstance(layer, layers.Conv3D):
            kernel, n_out = new[0], old[0].shape[-1]
            rows = old_inputs(layer.name, old[0].shape[-2])
            kernel[..., :n_out] = 0
            kernel[..., rows, :n_out] = old[0]
            new[0] = kernel
            if len(new) > 1:
                new[1][:] = 0
                new[1][:n_out] = old[1]
        else:                            # normalization: per-channel vectors
            for n, o in zip(new, old):
                n[:o.shape[0]] = o
        layer.set_weights(new)
    return wide


class ImageStatistics:
    """Wrap a model so that its batch normalization uses each input's own statistics.

    Networks trained with one image per batch normalize, during training, with that image's
    statistics; under domain randomization every image has a different contrast, so the
    running averages that Keras uses at inference can fit no image well. Calling the model in
    training mode at inference (moving averages are updated on this in-memory copy only and
    never saved) reproduces the training-time normalization. Offers ``predict_on_batch`` and
    ``output_shape`` like a Keras model.
    """

    #: how the wrapped model is called (for :func:`synthkit.backend.flip_predictor`)
    training = True

    def __init__(self, model):
        from . import backend
        self.model = model
        self.output_shape = model.output_shape
        # a graph on TensorFlow: less than half the memory of eager calls
        self._call = backend.predictor(model, training=True)

    def predict_on_batch(self, x):
        return np.asarray(self._call(np.asarray(x, np.float32)))


def load_weights(model, path):
    """``model.load_weights(path)``, with a one-line ``ValueError`` naming the file for a corrupt
    or mismatched weights file."""
    try:
        model.load_weights(path)
    except Exception as e:     # h5py, Keras and numpy raise many kinds for a bad file
        text = ' '.join(str(e).split())[:200] or type(e).__name__
        raise ValueError('%s: cannot load these weights (%s)' % (path, text)) from None


def load_unet(weights, card, precision='float32'):
    """Build the U-Net a model card describes and load ``weights`` into it: (model, config).
    ``precision``: the Keras dtype policy it computes in (weights stay float32; see
    :func:`synthkit.backend.inference_precision`).

    When the card's ``input.norm_statistics`` is ``'image'`` the model normalizes with each
    input's own statistics (see :class:`ImageStatistics`)."""
    from . import backend
    cfg = UNetConfig.from_dict(card['architecture'])
    with backend.dtype_policy(precision):
        model = unet(cfg)
    load_weights(model, weights)
    if card.get('input', {}).get('norm_statistics') == 'image':
        model = ImageStatistics(model)
    return model, cfg
