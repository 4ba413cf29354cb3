#!/usr/bin/env python3
"""Records real Keras runs of Adafactor on convolution kernels (needs Keras; not part of CI).

Keras stores a `Conv2D` kernel as `[kh, kw, in, out]` and factors every rank >= 2 variable over
its last two axes, so it keeps row and column statistics over `(in, out)`. candle stores the same
kernel as `[out, in, kh, kw]`. These recordings let the Rust tests check that a candle kernel,
with its factored axes set to `(out, in)`, gets exactly the optimizer Keras runs.

Run from the repository root with a Python environment that has the pinned Keras (the one
`bench/run_all.sh` creates in target/peers-venv will do):

    python3 -m venv /path/to/venv
    /path/to/venv/bin/pip install tensorflow-cpu==2.21.0 keras==3.15.1
    /path/to/venv/bin/python tools/keras_conv_record.py

It writes conformance/conv/*.json in the format of conformance/FORMAT.md: the variables are
the kernels and biases of a small Keras model of `Conv2D` layers, in Keras's layout, and the
gradients are those of a real loss on seeded random images (computed once per step with
`tf.GradientTape`, then applied with `optimizer.apply_gradients`).
"""

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402


def floats(a):
    """Exact decimal of each float32, as the conformance format asks."""
    return [float(x) for x in np.asarray(a, dtype=np.float32).reshape(-1)]


def model():
    keras.utils.set_random_seed(7)
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv3x3")(inputs)
    x = keras.layers.Activation("tanh")(x)
    x = keras.layers.Conv2D(5, 1, name="conv1x1")(x)
    x = keras.layers.Conv2D(3, (5, 3), padding="same", use_bias=False, name="conv5x3")(x)
    return keras.Model(inputs, x)


def record(name, optimizer, steps, out_dir, excluded=None):
    m = model()
    variables = m.trainable_variables
    if excluded:
        optimizer.exclude_from_weight_decay(var_names=excluded)
    rng = np.random.default_rng(11)
    case = {
        "name": name,
        "generator": f"keras {keras.__version__}, backend tensorflow (tools/keras_conv_record.py)",
        "config": keras.optimizers.serialize(optimizer),
        "layout": "Conv2D kernels in Keras's layout [kh, kw, in, out]; biases [out]",
        "variables": [
            {"name": v.path, "shape": list(v.shape), "dtype": "float32", "initial": floats(v.numpy())}
            for v in variables
        ],
        "steps": [],
    }
    if excluded:
        case["exclude_from_weight_decay"] = {"var_names": excluded}
    for _ in range(steps):
        images = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
        target = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(m(images) - target))
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        step = {
            "gradients": [floats(g.numpy()) for g in grads],
            "variables": [floats(v.numpy()) for v in variables],
            "iterations": int(optimizer.iterations.numpy()),
        }
        if optimizer.use_ema:
            step["ema"] = [
                floats(optimizer._model_variables_moving_average[optimizer._get_variable_index(v)].numpy())
                for v in variables
            ]
        case["steps"].append(step)
    cfg = case["config"]["config"]
    for k, v in list(cfg.items()):
        if isinstance(v, np.generic):
            cfg[k] = v.item()
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(case, f, indent=1)
        f.write("\n")
    print(f"wrote {path}: {len(variables)} variables, {steps} steps")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="conformance/conv")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    record("conv2d_paper_lr", keras.optimizers.Adafactor(learning_rate=1e-2), 6, args.dir)
    record(
        "conv2d_everything",
        keras.optimizers.Adafactor(
            learning_rate=1e-2,
            weight_decay=0.05,
            global_clipnorm=0.5,
            use_ema=True,
            ema_momentum=0.9,
        ),
        6,
        args.dir,
        excluded=["bias"],
    )


if __name__ == "__main__":
    main()
