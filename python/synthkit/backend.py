"""What differs between the Keras backends, in one place: compiling a function.

Model code is written with ``keras.ops`` and runs unchanged on TensorFlow, JAX and PyTorch; only
turning a Python function into a compiled program is backend-specific. On TensorFlow that is a
``tf.function`` graph (optionally XLA); on JAX and PyTorch functions run as they are here (their
training steps are compiled by Keras itself).
"""

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
