"""What differs between the Keras backends and machines, in one place: compiling a function, and
the precision networks compute in.

Model code is written with ``keras.ops`` and runs unchanged on TensorFlow, JAX and PyTorch; only
turning a Python function into a compiled program is backend-specific. On TensorFlow that is a
``tf.function`` graph (optionally XLA); on JAX and PyTorch functions run as they are here (their
training steps are compiled by Keras itself).

Keras (and with it TensorFlow, 3 s) is imported by the functions that need it, not by this module:
a command whose networks all run on OpenVINO (:mod:`synthkit.runtime`) never imports it.
"""

import os


def compiled(fn, jit=False, reduce_retracing=False, input_signature=None):
    """``fn`` compiled for the active backend: a TensorFlow graph (XLA with ``jit``; traced once
    for all inputs that fit ``input_signature``, a list of ``tf.TensorSpec`` structures, if
    given), or ``fn`` itself on the other backends."""
    import keras
    if keras.backend.backend() == 'tensorflow':
        import tensorflow as tf
        return tf.function(fn, jit_compile=True if jit else None,
                           reduce_retracing=reduce_retracing, input_signature=input_signature)
    return fn


def compiled_random(layer, fn, jit=None):
    """``fn(*tensors)``, a call of ``layer`` that draws random numbers (its seed generators'
    states advance at each call), compiled for the active backend: a TensorFlow graph (no XLA);
    on JAX, with ``jit`` (default: when JAX runs on an accelerator), one XLA program, stateless
    as ``jax.jit`` needs (the seed states go in and come out through ``keras.StatelessScope``
    and are stored back, so calls draw the same numbers as uncompiled ones); else ``fn`` itself.
    The environment variable SYNTHKIT_JIT=1 or 0 overrides the default (to try a GPU machine's
    path on a CPU).
    On a GPU the whole generator is then one program on the chip; on the CPU XLA's code for it is
    slower than running it op by op (96^3 at 2 mm: 0.57 vs 0.34 s per pair here)."""
    import keras
    name = keras.backend.backend()
    if name == 'tensorflow':
        return compiled(fn)
    if name != 'jax':
        return fn
    import jax
    if jit is None:
        forced = os.environ.get('SYNTHKIT_JIT', '')
        jit = forced == '1' if forced in ('0', '1') else jax.default_backend() != 'cpu'
    if not jit:
        return fn
    variables = []

    def pure(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
            out = fn(*args)
        new = [scope.get_current_value(v) for v in variables]
        return out, [v if n is None else n for v, n in zip(values, new)]

    program = jax.jit(pure)

    def call(*args):
        if not variables:               # the seed states exist once the layers are built
            if not layer.built:
                layer.build(None)
            variables.extend(layer.variables)
        out, values = program([v.value for v in variables], *args)
        for v, value in zip(variables, values):
            v.assign(value)
        return out
    return call


def predictor(model, training=False):
    """A compiled ``x -> model(x, training=training)``, made once per model and kept on it (a
    TensorFlow graph needs less than half the memory of eager execution and is faster). On
    TensorFlow it is traced once for inputs of any size (the model's own input shapes, which
    leave the spatial sizes free): tiles of many shapes do not each build a graph."""
    import keras
    attr = '_synthkit_predict_%s' % ('train' if training else 'infer')
    fn = getattr(model, attr, None)
    if fn is None:
        signature = None
        if keras.backend.backend() == 'tensorflow':
            import tensorflow as tf
            specs = [tf.TensorSpec(x.shape, x.dtype) for x in model.inputs]
            signature = [specs if len(specs) > 1 else specs[0]]
        fn = compiled(lambda x: model(x, training=training), reduce_retracing=True,
                      input_signature=signature)
        setattr(model, attr, fn)
    return fn


def flip_predictor(model, axis, out_perm, in_perm=None, training=False):
    """``x -> (model(x) + mirror(model(mirror_in(x)))) / 2`` as one TensorFlow graph, made once
    per flip and kept on the model, or None on the other backends: ``x`` (1, X, Y, Z, K) of any
    float dtype (float16 tiles go in as they are), mirrored along spatial ``axis`` (0-2) with
    its channels taken in ``in_perm`` order (if given), the mirrored prediction flipped back and
    its channels taken in ``out_perm`` order (left/right labels swapped). The cast, the flips
    and the channel permutations run inside the graph, on all threads, instead of as numpy
    copies of the tile; the mirrored pass starts after the first (peak memory of one pass)."""
    import keras
    if keras.backend.backend() != 'tensorflow':
        return None
    import tensorflow as tf
    key = (int(axis), tuple(int(i) for i in out_perm),
           None if in_perm is None else tuple(int(i) for i in in_perm), bool(training))
    cache = getattr(model, '_synthkit_flip', None)
    if cache is None:
        cache = {}
        setattr(model, '_synthkit_flip', cache)
    if key not in cache:
        ax, out_idx, in_idx, train = key

        def fn(x):
            x = tf.cast(x, 'float32')
            a = tf.cast(model(x, training=train), 'float32')
            with tf.control_dependencies([a]):
                m = tf.reverse(x, [ax + 1])
            if in_idx is not None:
                m = tf.gather(m, in_idx, axis=-1)
            b = tf.reverse(tf.cast(model(m, training=train), 'float32'), [ax + 1])
            return (a + tf.gather(b, out_idx, axis=-1)) * 0.5
        cache[key] = tf.function(fn, reduce_retracing=True)
    return cache[key]


PRECISIONS = ('float32', 'mixed_bfloat16')


class dtype_policy:
    """``with dtype_policy('mixed_bfloat16'):`` Keras layers built inside compute in that
    precision; the global policy before is restored after."""

    def __init__(self, name):
        if name not in PRECISIONS:
            raise ValueError('precision must be one of %s, got %r' % (', '.join(PRECISIONS), name))
        self.name = name

    def __enter__(self):
        import keras
        self.old = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.name)
        return self

    def __exit__(self, *exc):
        import keras
        keras.config.set_dtype_policy(self.old)


def bfloat16_hardware():
    """Whether this machine computes bfloat16 convolutions natively: a GPU, or a CPU with AMX
    or AVX-512 BF16 (:func:`bfloat16_cpu`). Where not, bfloat16 is emulated and slower
    than float32."""
    return accelerator() is not None or bfloat16_cpu()


def bfloat16_cpu():
    """Whether this CPU computes bfloat16 natively: AMX or AVX-512 BF16 in Linux's
    /proc/cpuinfo flags (no Keras import: :mod:`synthkit.runtime` asks it for OpenVINO)."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = f.read()
    except OSError:
        return False
    return 'amx_bf16' in flags or 'avx512_bf16' in flags


#: the names SYNTHKIT_PRECISION takes (bfloat16 is short for mixed_bfloat16)
INFERENCE_PRECISIONS = ('auto', 'float32', 'bfloat16', 'mixed_bfloat16')


def inference_precision(name=None, hardware=None):
    """The precision the shipped networks compute in at inference: ``name`` or else the
    environment variable SYNTHKIT_PRECISION, one of :data:`INFERENCE_PRECISIONS`; 'auto' (the
    default) is mixed_bfloat16 where the hardware computes bfloat16 natively
    (:func:`bfloat16_hardware`), else float32. Weights stay float32 and each network's head
    computes in float32 (nets.unet); docs/training.md has what it changes. ``hardware``: the
    function that tells whether bfloat16 is native (default :func:`bfloat16_hardware`; a runtime
    that computes on the CPU alone passes :func:`bfloat16_cpu`)."""
    name = (name or os.environ.get('SYNTHKIT_PRECISION') or 'auto').strip().lower()
    if name not in INFERENCE_PRECISIONS:
        raise ValueError('SYNTHKIT_PRECISION must be one of %s, got %r'
                         % (', '.join(INFERENCE_PRECISIONS), name))
    if name == 'auto':
        native = (hardware or bfloat16_hardware)()
        return 'mixed_bfloat16' if native else 'float32'
    return 'mixed_bfloat16' if name == 'bfloat16' else name


def accelerator():
    """The accelerator the Keras backend uses (its name), or None on the CPU."""
    import keras
    try:
        backend = keras.backend.backend()
        if backend == 'jax':
            import jax
            dev = jax.devices()[0]
            return None if dev.platform == 'cpu' else dev.device_kind
        if backend == 'torch':
            import torch
            return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        if backend == 'tensorflow':
            import tensorflow as tf
            gpus = tf.config.list_physical_devices('GPU')
            return '%d GPU(s)' % len(gpus) if gpus else None
    except Exception:          # a description only: never fail a checkpoint over it
        return None
    return None
