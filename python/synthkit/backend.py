"""What differs between the Keras backends, in one place: compiling a function.

Model code is written with ``keras.ops`` and runs unchanged on TensorFlow, JAX and PyTorch; only
turning a Python function into a compiled program is backend-specific. On TensorFlow that is a
``tf.function`` graph (optionally XLA); on JAX and PyTorch functions run as they are here (their
training steps are compiled by Keras itself).
"""

import os

import keras


def compiled(fn, jit=False, reduce_retracing=False, input_signature=None):
    """``fn`` compiled for the active backend: a TensorFlow graph (XLA with ``jit``; traced once
    for all inputs that fit ``input_signature``, a list of ``tf.TensorSpec`` structures, if
    given), or ``fn`` itself on the other backends."""
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
