"""Which runtime computes a shipped U-Net at inference: OpenVINO, or Keras on TensorFlow.

Every tool's networks are Keras models (:mod:`synthkit.nets`), trained and saved by Keras. At
inference a plain U-Net (the SynthSeg, SynthStrip and parcellation networks: convolutions, ELU,
batch normalization on each image's own statistics, max pooling, nearest upsampling, a softmax
or linear head) is a fixed graph that OpenVINO computes as well, from the same ``.weights.h5``
file: importing OpenVINO takes 0.2 s where TensorFlow and Keras take 3-3.5 s, and its first call
of a network is 0.4 s where TensorFlow's (oneDNN's set-up of every convolution) is 1.1 s; the
arithmetic itself is as fast (bfloat16 on CPUs with AMX). A command that needs no other Keras
model (``mri_synthseg``, ``mri_synthstrip``) then never imports TensorFlow.

The environment variable SYNTHKIT_RUNTIME picks: ``auto`` (the default: OpenVINO where it is
installed and the network is a plain U-Net, else Keras), ``keras`` or ``openvino`` (an error
where it cannot be used). docs/architecture.md ("Inference runtimes") has the measurements.
"""

import os
import threading

import numpy as np

from .nets import UNetConfig      # nets imports Keras only where it builds a network

RUNTIMES = ('auto', 'keras', 'openvino')

#: threads OpenVINO computes with (``--threads``: :func:`synthkit.cli.common.set_threads`)
_threads = [None]


def set_threads(n):
    """Compute with ``n`` threads (None: OpenVINO's default, all cores)."""
    _threads[0] = int(n) if n and n > 0 else None


def choice(name=None):
    """The runtime asked for: ``name`` or SYNTHKIT_RUNTIME, one of :data:`RUNTIMES`."""
    name = (name or os.environ.get('SYNTHKIT_RUNTIME') or 'auto').strip().lower()
    if name not in RUNTIMES:
        raise ValueError('SYNTHKIT_RUNTIME must be one of %s, got %r' % (', '.join(RUNTIMES), name))
    return name


def openvino_available():
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def supported(card):
    """Why OpenVINO cannot compute the network a model card describes (a reason), or None."""
    arch = card.get('architecture', {})
    if arch.get('type') != 'unet':
        return 'not a plain U-Net (%s)' % arch.get('type')
    norm = arch.get('norm', 'batch')
    if norm not in ('batch', None, 'none'):
        return 'normalization %r' % norm
    if norm == 'batch' and card.get('input', {}).get('norm_statistics') != 'image':
        return 'batch normalization with moving averages'
    if arch.get('activation', 'elu') not in _ACTIVATIONS:
        return 'activation %r' % arch.get('activation')
    if arch.get('final_activation', 'softmax') not in ('softmax', 'linear', None):
        return 'final activation %r' % arch.get('final_activation')
    return None


def load_unet(weights, card, precision=None, runtime=None):
    """The U-Net a model card describes with ``weights`` loaded: (model, config), the model
    offering ``predict_on_batch`` and ``output_shape`` as a Keras model does. OpenVINO where
    :func:`choice` allows it and the card's network is one it computes, else
    :func:`synthkit.nets.load_unet` (Keras). ``precision``: as
    :func:`synthkit.backend.inference_precision` takes it (None: SYNTHKIT_PRECISION or 'auto';
    OpenVINO's 'auto' asks the CPU alone, without importing Keras to look for a GPU)."""
    model = _openvino_unet(weights, card, precision, runtime)
    if model is not None:
        return model, model.cfg
    from . import backend, nets
    return nets.load_unet(weights, card, backend.inference_precision(precision))


def load_part(weights, unet_architecture, norm_statistics, precision=None, runtime=None):
    """The U-Net of ``unet_architecture`` (a model card's ``architecture`` entry for it, e.g. a
    SynthSR hybrid's ``unet``) within ``weights`` as an :class:`OpenVINOUNet`, or None where
    the Keras runtime is to compute it (as :func:`load_unet` decides).
    ``norm_statistics``: the card's ``input.norm_statistics``."""
    card = {'architecture': dict(unet_architecture, type='unet'),
            'input': {'norm_statistics': norm_statistics}}
    return _openvino_unet(weights, card, precision, runtime)


def _openvino_unet(weights, card, precision, runtime):
    """The card's U-Net on OpenVINO, or None where Keras is to compute it (SYNTHKIT_RUNTIME=keras;
    'auto' where OpenVINO is not installed or cannot compute the network; 'openvino' raises
    ``ValueError`` there)."""
    from . import backend
    name = choice(runtime)
    why = supported(card)
    if name == 'openvino' and why is not None:
        raise ValueError('SYNTHKIT_RUNTIME=openvino cannot compute this network: %s' % why)
    if name == 'openvino' and not openvino_available():
        raise ValueError('SYNTHKIT_RUNTIME=openvino, but OpenVINO is not installed '
                         '(pip install openvino)')
    if name == 'keras' or why is not None or not openvino_available():
        return None
    cfg = UNetConfig.from_dict(card['architecture'])
    precision = backend.inference_precision(precision, hardware=backend.bfloat16_cpu)
    return OpenVINOUNet(cfg, read_weights(weights, cfg), precision)


def read_weights(path, cfg):
    """The convolutions' (kernel, bias) and the normalizations' (scale, offset) of a U-Net's
    Keras ``.weights.h5`` file, in the order :func:`synthkit.nets.unet` creates the layers
    (Keras numbers each layer class in that order: conv3d, conv3d_1, ...), read with h5py:
    {'conv': [...], 'norm': [...]}. The U-Net may also be a part of a larger model (a nested
    functional model, as SynthSR's hybrid holds its ``sr_core``): the one whose layers fit
    ``cfg`` is taken. A file without such a U-Net raises ``ValueError``."""
    import h5py
    n_conv = cfg.levels * cfg.convs_per_level + (cfg.levels - 1) * cfg.convs_per_level + 1
    n_norm = 0 if cfg.norm in (None, 'none') else 2 * cfg.levels - 1
    found = []
    try:
        with h5py.File(path, 'r') as f:
            groups = [f['layers']] + [f['layers'][k]['layers'] for k in f['layers']
                                      if 'layers' in f['layers'][k]]
            for group in groups:
                convs = [tuple(np.asarray(group[k]['vars'][str(i)], np.float32)
                               for i in range(2)) for k in _numbered(group, 'conv3d')]
                norms = [tuple(np.asarray(group[k]['vars'][str(i)], np.float32)
                               for i in range(2)) for k in _numbered(group, 'batch_normalization')]
                found.append((convs, norms))
    except (OSError, KeyError) as e:
        raise ValueError('%s: cannot read these weights (%s)' % (path, e)) from None
    counts = []
    for convs, norms in found:
        if not convs:
            continue
        counts.append('%d convolutions and %d normalizations' % (len(convs), len(norms)))
        if len(convs) != n_conv or len(norms) != n_norm:
            continue
        first, head = convs[0][0], convs[-1][0]
        if first.shape[3] == cfg.in_channels and first.shape[4] == cfg.features and \
                head.shape[4] == cfg.out_channels:
            return {'conv': convs, 'norm': norms}
    raise ValueError('%s: no U-Net of the card\'s (%d convolutions and %d normalizations, %d '
                     'input, %d features, %d output channels) in these weights (%s)'
                     % (path, n_conv, n_norm, cfg.in_channels, cfg.features, cfg.out_channels,
                        '; '.join(counts) or 'no convolutions'))


def _numbered(group, base):
    """``base``, ``base_1``, ``base_2``, ... of an h5py group, in Keras' numbering order."""
    names = [k for k in group if k == base or
             (k.startswith(base + '_') and k[len(base) + 1:].isdigit())]
    return sorted(names, key=lambda k: -1 if k == base else int(k[len(base) + 1:]))


_ACTIVATIONS = ('elu', 'relu', 'linear')

#: Keras' BatchNormalization epsilon (the default, as nets.unet builds it)
_EPSILON = 1e-3


class OpenVINOUNet:
    """A U-Net of :func:`synthkit.nets.unet` as an OpenVINO program on the CPU: the same
    function as the Keras model in training-mode normalization (:class:`synthkit.nets.
    ImageStatistics`: each image normalized with its own statistics), inputs and outputs
    (1, X, Y, Z, C) float32 as Keras has them.

    ``precision`` 'mixed_bfloat16' asks OpenVINO for bfloat16 inference (its CPU plugin then
    rounds the normalizations too, which Keras' mixed policy keeps in float32: argmax agreement
    with float32 99.85 % against Keras' 99.94 % on a 2 mm OASIS grid, the same benchmark Dice);
    else float32. Programs are compiled for each input shape; flip-averaged prediction is one
    program too (:meth:`flip_program`)."""

    def __init__(self, cfg, weights, precision='float32'):
        import openvino as ov
        self.cfg = cfg
        self.weights = weights
        self.output_shape = (None, None, None, None, cfg.out_channels)
        self.precision = precision
        self.bfloat16 = precision == 'mixed_bfloat16'
        self._core = ov.Core()
        self._programs = {}
        self._lock = threading.Lock()

    # -- the graph
    def _network(self, x):
        """OpenVINO nodes of the U-Net on ``x`` (1, C, X, Y, Z)."""
        from openvino import opset13 as op
        cfg, w = self.cfg, self.weights
        convs, norms = iter(w['conv']), iter(w['norm'])

        def const(a):
            return op.constant(np.ascontiguousarray(a, np.float32))

        def conv(x, act):
            kernel, bias = next(convs)
            pad = [kernel.shape[0] // 2] * 3
            y = op.convolution(x, const(np.transpose(kernel, (4, 3, 0, 1, 2))), [1, 1, 1], pad,
                               pad, [1, 1, 1])
            y = op.add(y, const(bias.reshape(1, -1, 1, 1, 1)))
            if act == 'elu':
                return op.elu(y, 1.0)
            if act == 'relu':
                return op.relu(y)
            return y

        def block(x):
            for _ in range(cfg.convs_per_level):
                x = conv(x, cfg.activation)
            if cfg.norm in (None, 'none'):
                return x
            scale, offset = next(norms)
            y = op.mvn(x, op.constant(np.array([2, 3, 4], np.int64)), True, _EPSILON,
                       'inside_sqrt')
            return op.add(op.multiply(y, const(scale.reshape(1, -1, 1, 1, 1))),
                          const(offset.reshape(1, -1, 1, 1, 1)))

        skips = []
        for level in range(cfg.levels):
            x = block(x)
            if level < cfg.levels - 1:
                skips.append(x)
                x = op.max_pool(x, [2, 2, 2], [1, 1, 1], [0, 0, 0], [0, 0, 0], [2, 2, 2]).output(0)
        for level in reversed(range(cfg.levels - 1)):
            x = op.interpolate(x, op.constant(np.array([2, 2, 2], np.float32)), 'nearest',
                               'scales', axes=op.constant(np.array([2, 3, 4], np.int64)))
            x = op.concat([x, skips[level]], 1)
            x = block(x)
        y = conv(x, None)
        if cfg.final_activation == 'softmax':
            y = op.softmax(y, 1)
        return y

    def _run(self, key, build, x):
        """The program ``build(op, x)`` makes for ``key`` on ``x``: compiled for x's shape
        (static shapes: 25 % less memory than one program for all sizes, and faster) and
        dtype (float16 inputs, e.g. SynthSR's 34-channel tiles, go in as they are and are
        converted inside the program: no float32 copy of the tile), the program of the last
        shape kept per key (0.1 s to compile; tiles of one scan share a shape), its request's
        output copied out (the next call reuses the buffer). Calls are serialized (one
        request per program; a batch worker's threads may share a network)."""
        dtype = np.float16 if np.asarray(x).dtype == np.float16 else np.float32
        x = np.ascontiguousarray(x, dtype)
        if x.ndim != 5 or x.shape[0] != 1 or x.shape[-1] != self.cfg.in_channels:
            raise ValueError('expected a (1, X, Y, Z, %d) input, got %s'
                             % (self.cfg.in_channels, x.shape))
        if any(n % self.cfg.divisor for n in x.shape[1:4]):
            raise ValueError('input sizes %s must be multiples of %d'
                             % (x.shape[1:4], self.cfg.divisor))
        with self._lock:
            shape, request = self._programs.get(key, (None, None))
            if shape != (x.shape, dtype):
                import openvino as ov
                from openvino import opset13 as op
                self._programs.pop(key, None)      # its buffers go before the next's come
                request = None
                param = op.parameter(list(x.shape), dtype, name='x')
                inp = param if dtype == np.float32 else op.convert(param, np.float32)
                model = ov.Model([build(op, inp)], [param], 'unet')
                config = {'INFERENCE_PRECISION_HINT': 'bf16' if self.bfloat16 else 'f32'}
                if _threads[0]:
                    config['INFERENCE_NUM_THREADS'] = _threads[0]
                request = self._core.compile_model(model, 'CPU', config).create_infer_request()
                self._programs[key] = ((x.shape, dtype), request)
            out = request.infer({0: x}, share_inputs=True, share_outputs=True)[0]
            return np.array(out, np.float32)

    def release(self):
        """Free the compiled programs and their buffers (the next call compiles again): a
        scan's network pass is over, and its memory is wanted for what follows."""
        with self._lock:
            self._programs.clear()

    def predict_on_batch(self, x):
        """(1, X, Y, Z, in) -> (1, X, Y, Z, out) float32."""
        def build(op, x):
            y = self._network(op.transpose(x, op.constant(np.array([0, 4, 1, 2, 3]))))
            return op.transpose(y, op.constant(np.array([0, 2, 3, 4, 1])))
        return self._run('plain', build, x)

    def flip_program(self, axis, out_perm, in_perm=None):
        """``x -> (net(x) + mirror(net(mirror_in(x)))) / 2`` as one program (the arguments as
        :func:`synthkit.backend.flip_predictor` takes them): x mirrored along spatial ``axis``
        with its channels in ``in_perm`` order, the mirrored prediction flipped back and its
        channels taken in ``out_perm`` order."""
        key = ('flip', int(axis), tuple(int(i) for i in out_perm),
               None if in_perm is None else tuple(int(i) for i in in_perm))

        def mirror(op, x):
            i64 = np.int64
            return op.slice(x, op.constant(np.array([-1], i64)),
                            op.constant(np.array([np.iinfo(i64).min], i64)),
                            op.constant(np.array([-1], i64)),
                            op.constant(np.array([axis + 2], i64)))

        def build(op, x):
            x = op.transpose(x, op.constant(np.array([0, 4, 1, 2, 3])))
            a = self._network(x)
            m = mirror(op, x)
            if in_perm is not None:
                m = op.gather(m, op.constant(np.array(key[3], np.int64)),
                              op.constant(np.int64(1)))
            b = mirror(op, self._network(m))
            b = op.gather(b, op.constant(np.array(key[2], np.int64)), op.constant(np.int64(1)))
            y = op.multiply(op.add(a, b), op.constant(np.float32(0.5)))
            return op.transpose(y, op.constant(np.array([0, 2, 3, 4, 1])))

        return lambda x: self._run(key, build, x)
