"""Run the artifact's network(s): Keras or the TFLite fast path, one or several members.

Each member is a Keras model with three outputs: ``logit`` (N, 1), ``embedding`` (N, C) (the
globally pooled last feature map, used by the input check) and ``cam`` (N, h, w, 1) (the
class-activation map: the final dense layer applied at every position, whose mean equals the
logit, so it is exactly what Grad-CAM gives for a GAP + dense head, without gradients).
The ensemble's logit is the mean of the members' logits.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from inference.artifact import ArtifactError, ArtifactMeta

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class RawOutput:
    logits: F32  # (N,) ensemble mean logit, before temperature
    embedding: F32  # (N, C) member 0's pooled features
    cam: F32  # (N, h, w) ensemble mean class-activation map (logit units)


def _split_outputs(outputs: list[F32]) -> tuple[F32, F32, F32]:
    logit = emb = cam = None
    for o in outputs:
        if o.ndim == 4:
            cam = o[..., 0]
        elif o.ndim == 2 and o.shape[1] == 1:
            logit = o[:, 0]
        elif o.ndim == 2:
            emb = o
    if logit is None or emb is None or cam is None:
        raise ArtifactError(f"unexpected model outputs {[o.shape for o in outputs]}")
    return logit, emb, cam


class _KerasMember:
    def __init__(self, path: Path) -> None:
        import keras

        self.model = keras.models.load_model(path, compile=False)

    def __call__(self, x: F32) -> tuple[F32, F32, F32]:
        out = self.model.predict_on_batch(x)
        outs = list(out.values()) if isinstance(out, dict) else list(out)
        return _split_outputs([np.asarray(o, dtype=np.float32) for o in outs])


# A batch goes to the model in pieces of at most MAX_BATCH images.
MAX_BATCH = 8


def padded_size(n: int) -> int:
    """The batch size a TFLite member runs ``n`` (1..MAX_BATCH) images at: the next power of
    two. Each size keeps its own interpreter, so studies of 1, 2, 3 images in turn never
    re-allocate tensors (about 0.8 ms a member each time, more than batching saves); a padded
    slot (zeros) costs its share of the batch and changes no other image's numbers."""
    if not 1 <= n <= MAX_BATCH:
        raise ValueError(f"a batch of {n} images is not 1..{MAX_BATCH}")
    return 1 << (n - 1).bit_length()


class _TFLiteMember:
    def __init__(self, path: Path, num_threads: int) -> None:
        self.path = path
        self.num_threads = num_threads
        self.interpreters: dict[int, Any] = {}  # padded batch size -> its interpreter
        self.lock = threading.Lock()  # an Interpreter is not thread-safe
        self._interpreter(1)  # a broken file fails at load, not at the first study

    def _interpreter(self, batch: int) -> Any:
        interp = self.interpreters.get(batch)
        if interp is None:
            import warnings

            import tensorflow as tf

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
                interp = tf.lite.Interpreter(
                    model_path=str(self.path), num_threads=self.num_threads
                )
            index = interp.get_input_details()[0]["index"]
            shape = list(interp.get_input_details()[0]["shape"])
            interp.resize_tensor_input(index, [batch, *shape[1:]])
            interp.allocate_tensors()
            self.interpreters[batch] = interp
        return interp

    def __call__(self, x: F32) -> tuple[F32, F32, F32]:
        n = x.shape[0]
        size = padded_size(n)
        batch = np.zeros((size, *x.shape[1:]), dtype=np.float32)
        batch[:n] = x
        with self.lock:
            interp = self._interpreter(size)
            interp.set_tensor(interp.get_input_details()[0]["index"], batch)
            interp.invoke()
            outs = [
                np.array(interp.get_tensor(d["index"])[:n], dtype=np.float32)
                for d in interp.get_output_details()
            ]
        return _split_outputs(outs)


class ModelRunner:
    """Loads the members once; ``run`` is safe to call from several threads."""

    def __init__(self, folder: Path, meta: ArtifactMeta, *, backend: str = "tflite") -> None:
        if backend not in ("tflite", "keras"):
            raise ValueError(f"backend must be 'tflite' or 'keras', not {backend!r}")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        threads = int(os.environ.get("CXR_INFERENCE_THREADS", "0")) or (os.cpu_count() or 1)
        self.backend = backend
        self.members: list[Any] = []
        for stem in meta.members:
            path = folder / f"{stem}.{backend}"
            if not path.exists():
                raise ArtifactError(f"artifact has no {path.name}")
            member = _TFLiteMember(path, threads) if backend == "tflite" else _KerasMember(path)
            self.members.append(member)

    def run(self, x: F32) -> RawOutput:
        """``x``: (N, S, S, 1) preprocessed batch, run in pieces of at most MAX_BATCH."""
        if len(x) <= MAX_BATCH:
            return self._run(x)
        parts = [self._run(x[i : i + MAX_BATCH]) for i in range(0, len(x), MAX_BATCH)]
        return RawOutput(
            logits=np.concatenate([p.logits for p in parts]),
            embedding=np.concatenate([p.embedding for p in parts]),
            cam=np.concatenate([p.cam for p in parts]),
        )

    def _run(self, x: F32) -> RawOutput:
        logits, cams = [], []
        emb: F32 | None = None
        for i, member in enumerate(self.members):
            lg, e, c = member(x)
            logits.append(lg)
            cams.append(c)
            if i == 0:
                emb = e
        assert emb is not None
        return RawOutput(
            logits=np.mean(logits, axis=0).astype(np.float32),
            embedding=emb,
            cam=np.mean(cams, axis=0).astype(np.float32),
        )


# Which ReLU outputs (in model order) feed the input check: the middle blocks. Early layers see
# only texture and the last one only the classes; the middle ones separated non-chest images
# best (knee, dog lateral, photos, documents, rotated chests) in the experiment of the v1 run.
OOD_ACTIVATIONS = slice(2, 7)


def _ood_activations(trained: Any) -> list[Any]:
    import keras

    acts = [la for la in trained.layers if isinstance(la, keras.layers.Activation)]
    return acts[OOD_ACTIVATIONS]


def ood_layer_dims(trained: Any) -> list[int]:
    """Channel count of each activation that the serving model's embedding concatenates."""
    return [int(a.output.shape[-1]) for a in _ood_activations(trained)]


def serving_model(trained: Any) -> Any:
    """Wrap a trained member (see training.models) into the three-output serving model.

    ``embedding`` concatenates the spatial means of the OOD_ACTIVATIONS feature maps.
    """
    import keras
    from keras import layers

    dense = trained.get_layer("logit")
    fmap = trained.get_layer("features").output
    kernel, bias = dense.get_weights()
    cam_layer = layers.Dense(1, name="cam")
    cam = cam_layer(fmap)
    cam_layer.set_weights([kernel, bias])
    pooled = [
        layers.GlobalAveragePooling2D(name=f"ood_pool{i}")(a.output)
        for i, a in enumerate(_ood_activations(trained))
    ]
    emb = layers.Concatenate(name="embedding")(pooled)
    logit = trained.outputs[0]
    return keras.Model(trained.inputs, {"logit": logit, "embedding": emb, "cam": cam})


def to_tflite(model: Any) -> bytes:
    """Convert a Keras serving model to TFLite (float32, no quantisation: same outputs)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    return bytes(converter.convert())
