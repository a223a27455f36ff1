"""Losses shared by the models (backend-agnostic, ``keras.ops``). Model-specific losses live with
their model (e.g. :mod:`synthkit.models.synthstrip.task`)."""

import keras
from keras import ops


def soft_dice_loss(y_true, y_pred, eps=1e-5):
    """1 - mean over channels of the soft Dice between one-hot ``y_true`` and ``y_pred``."""
    axes = tuple(range(1, len(y_pred.shape) - 1))
    inter = ops.sum(y_true * y_pred, axis=axes)
    denom = ops.sum(y_true + y_pred, axis=axes)
    return 1 - ops.mean((2 * inter + eps) / (denom + eps), axis=-1)


class DiceCELoss(keras.losses.Loss):
    """Soft Dice plus ``ce_weight`` x categorical cross-entropy (the CE term speeds up the start
    of training and keeps gradients for absent labels; set it to 0 for pure soft Dice)."""

    def __init__(self, ce_weight=1.0, name='dice_ce', **kwargs):
        super().__init__(name=name, **kwargs)
        self.ce_weight = ce_weight

    def call(self, y_true, y_pred):
        loss = soft_dice_loss(y_true, y_pred)
        if self.ce_weight:
            p = ops.clip(y_pred, 1e-7, 1.0)
            ce = -ops.mean(ops.sum(y_true * ops.log(p), axis=-1),
                           axis=tuple(range(1, len(y_pred.shape) - 1)))
            loss = loss + self.ce_weight * ce
        return loss

    def get_config(self):
        return {**super().get_config(), 'ce_weight': self.ce_weight}


CUSTOM_OBJECTS = {'DiceCELoss': DiceCELoss}
