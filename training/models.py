"""Model definitions (random initialisation only: no pretrained weights can be downloaded).

Models take the preprocessed (size, size, 1) tensor and output one logit for PNEUMONIA.
The last convolution is named ``features`` (used by Grad-CAM and by the input check).
"""

from __future__ import annotations

from typing import Any


def build_model(arch: str, size: int, *, seed: int, dropout: float = 0.3, l2: float = 1e-4) -> Any:
    """Return an uncompiled Keras model. ``arch``: "cnn-s" (~0.6 M params) or "cnn-m" (~1.5 M)."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    widths = {"cnn-s": (24, 48, 96, 160, 256), "cnn-m": (32, 64, 128, 192, 320)}
    if arch not in widths:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(widths)}")
    w = widths[arch]
    reg = keras.regularizers.L2(l2)

    def conv(x: Any, filters: int, stride: int = 1, name: str | None = None) -> Any:
        x = layers.Conv2D(
            filters, 3, strides=stride, padding="same", use_bias=False, kernel_regularizer=reg
        )(x)
        x = layers.BatchNormalization()(x)
        return layers.Activation("relu", name=name)(x)

    inputs = keras.Input((size, size, 1), name="image")
    x = conv(inputs, w[0], stride=2)
    x = conv(x, w[0])
    x = layers.MaxPooling2D()(x)
    x = conv(x, w[1])
    x = conv(x, w[1])
    x = layers.MaxPooling2D()(x)
    x = conv(x, w[2])
    x = conv(x, w[2])
    x = layers.MaxPooling2D()(x)
    x = conv(x, w[3])
    x = layers.SpatialDropout2D(0.1)(x)
    x = conv(x, w[4], name="features")
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(dropout)(x)
    logit = layers.Dense(1, name="logit", kernel_regularizer=reg)(x)
    return keras.Model(inputs, logit, name=arch)
