"""What differs between the Keras backends, in one place: compiling a function.

Model code is written with ``keras.ops`` and runs unchanged on TensorFlow, JAX and PyTorch; only
turning a Python function into a compiled program is backend-specific. On TensorFlow that is a
``tf.function`` graph (optionally XLA); on JAX and PyTorch functions run as they are here (their
training steps are compiled by Keras itself).
"""

import keras


def compiled(fn, jit=False, reduce_retracing=False):
    """``fn`` compiled for the active backend: a TensorFlow graph (XLA with ``jit``), or ``fn``
    itself on the other backends."""
    if keras.backend.backend() == 'tensorflow':
        import tensorflow as tf
        return tf.function(fn, jit_compile=True if jit else None,
                           reduce_retracing=reduce_retracing)
    return fn


def predictor(model, training=False):
    """A compiled ``x -> model(x, training=training)``, made once per model and kept on it (a
    TensorFlow graph needs less than half the memory of eager execution and is faster)."""
    attr = '_synthkit_predict_%s' % ('train' if training else 'infer')
    fn = getattr(model, attr, None)
    if fn is None:
        fn = compiled(lambda x: model(x, training=training), reduce_retracing=True)
        setattr(model, attr, fn)
    return fn
