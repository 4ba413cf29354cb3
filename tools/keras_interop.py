#!/usr/bin/env python3
"""Keras interop data for candle-adafactor (needs Keras; not part of CI).

Run from the repository root with a Python environment that has the pinned Keras:

    python3 -m venv /path/to/venv
    /path/to/venv/bin/pip install tensorflow-cpu==2.21.0 keras==3.15.1
    /path/to/venv/bin/python tools/keras_interop.py

It does three things, in conformance/interop/ (override with --dir):

(a) Reads rust_configs.json (our `get_config()` documents, written by the Rust test
    `rust_configs_file_is_current` with ADAFACTOR_WRITE_INTEROP=1), deserializes each one with
    `keras.optimizers.deserialize` and checks that Keras re-serializes it unchanged (the
    auto-generated `name` aside). Any difference is printed and the script exits with status 1.
(b) Writes keras_configs.json: Keras's own `get_config()` and `keras.optimizers.serialize()`
    output for several Adafactor configurations, including one per learning-rate schedule class.
(c) Writes keras_weights.json: a Keras Adafactor built on variables of rank 0, 1, 2 and 3; its
    `optimizer.variables` (name, path, shape, dtype, values) right after build and after 3 steps
    of fixed gradients, and the model variables after a 4th step. The Rust test
    tests/keras_interop.rs checks that our `keras_variables()` reproduces these and that
    `set_keras_weights()` imports them.
"""

import argparse
import copy
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import keras  # noqa: E402
from keras.src import backend  # noqa: E402

schedules = keras.optimizers.schedules


def plain(x):
    """Makes Keras config values JSON-serializable (NumPy scalars to Python numbers)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def without_name(cfg):
    return {k: v for k, v in cfg.items() if k != "name"}


def check_rust_configs(path):
    """(a): every Rust get_config document survives Keras's deserialize/serialize unchanged."""
    with open(path) as f:
        doc = json.load(f)
    failures = 0
    for entry in doc["configs"]:
        label, cfg = entry["label"], entry["config"]
        try:
            opt = keras.optimizers.deserialize(
                {
                    "module": "keras.optimizers",
                    "class_name": "Adafactor",
                    # deserialize() replaces a nested schedule dict by the object in place.
                    "config": copy.deepcopy(cfg),
                    "registered_name": None,
                }
            )
        except Exception as e:  # report every failing document, not just the first
            print(f"rust config {label}: Keras refused it: {e}")
            failures += 1
            continue
        back = plain(opt.get_config())
        ser = plain(keras.optimizers.serialize(opt))["config"]
        ok = True
        for what, got in (("get_config", back), ("serialize", ser)):
            if without_name(got) != without_name(cfg):
                failures += 1
                ok = False
                print(f"rust config {label}: Keras {what} differs")
                for k in sorted(set(got) | set(cfg)):
                    if k != "name" and got.get(k) != cfg.get(k):
                        print(f"    {k}: ours {cfg.get(k)!r}, keras {got.get(k)!r}")
        if ok:
            print(f"rust config {label}: ok")
    return failures


def keras_configs():
    """(b): Keras's serialized form of several configurations."""
    cases = [
        ("defaults", keras.optimizers.Adafactor()),
        (
            "all_arguments",
            keras.optimizers.Adafactor(
                learning_rate=0.02,
                beta_2_decay=-0.7,
                epsilon_1=1e-29,
                epsilon_2=2e-3,
                clip_threshold=0.5,
                relative_step=False,
                weight_decay=0.004,
                clipnorm=1.5,
                use_ema=True,
                ema_momentum=0.95,
                ema_overwrite_frequency=4,
                loss_scale_factor=128.0,
                gradient_accumulation_steps=3,
                name="my_adafactor",
            ),
        ),
        ("clipvalue", keras.optimizers.Adafactor(learning_rate=0.1, clipvalue=0.25)),
        ("global_clipnorm", keras.optimizers.Adafactor(global_clipnorm=2.0)),
        (
            "exponential_decay",
            keras.optimizers.Adafactor(
                learning_rate=schedules.ExponentialDecay(0.1, 10, 0.5, staircase=True)
            ),
        ),
        (
            "piecewise_constant_decay",
            keras.optimizers.Adafactor(
                learning_rate=schedules.PiecewiseConstantDecay([10, 20], [1.0, 0.5, 0.1])
            ),
        ),
        (
            "polynomial_decay",
            keras.optimizers.Adafactor(
                learning_rate=schedules.PolynomialDecay(0.1, 10, 0.01, power=2.0, cycle=True)
            ),
        ),
        (
            "inverse_time_decay",
            keras.optimizers.Adafactor(
                learning_rate=schedules.InverseTimeDecay(0.1, 10, 0.5),
                weight_decay=0.01,
            ),
        ),
        (
            "cosine_decay",
            keras.optimizers.Adafactor(
                learning_rate=schedules.CosineDecay(
                    0.0, 10, alpha=0.1, warmup_target=1.0, warmup_steps=5
                )
            ),
        ),
        (
            "cosine_decay_restarts",
            keras.optimizers.Adafactor(
                learning_rate=schedules.CosineDecayRestarts(1.0, 10, t_mul=2.0, m_mul=0.5),
                use_ema=True,
            ),
        ),
    ]
    return [
        {
            "label": label,
            "get_config": plain(opt.get_config()),
            "serialize": plain(keras.optimizers.serialize(opt)),
        }
        for label, opt in cases
    ]


def snapshot(opt):
    return [
        {
            "name": v.name,
            "path": v.path,
            "shape": list(v.shape),
            "dtype": str(backend.standardize_dtype(v.dtype)),
            "values": plain(np.asarray(v.numpy()).reshape(-1).tolist()),
        }
        for v in opt.variables
    ]


def weights_case(label, make_optimizer, steps=4):
    """(c): one Keras Adafactor on variables of rank 0 to 3, 3 steps, a snapshot, a 4th step."""
    shapes = {"w0": (), "w1": (3,), "w2": (3, 2), "w3": (2, 2, 3)}
    variables, initial = [], []
    for k, (name, shape) in enumerate(shapes.items()):
        n = int(np.prod(shape, dtype=np.int64))
        init = (np.linspace(-1.0, 1.5, n) + 0.25 * k).astype(np.float32).reshape(shape)
        variables.append(keras.Variable(init, name=name))
        initial.append(init)
    grads = []
    for s in range(steps):
        grads.append(
            [
                (
                    np.sin(np.arange(int(np.prod(shape, dtype=np.int64))) * 0.7 + 1.3 * s + k)
                    * (0.5 + 0.25 * k)
                )
                .astype(np.float32)
                .reshape(shape)
                for k, shape in enumerate(shapes.values())
            ]
        )
    opt = make_optimizer()
    # Build as apply() does (inside the optimizer's name scope), so slot paths are the same as
    # those of an optimizer built by its first apply.
    with backend.name_scope(opt.name, caller=opt):
        opt.build(variables)
    at_build = snapshot(opt)
    for s in range(3):
        opt.apply_gradients(zip(grads[s], variables))
    after_3 = snapshot(opt)
    weights_3 = [np.asarray(v.numpy()).reshape(-1).tolist() for v in variables]
    opt.apply_gradients(zip(grads[3], variables))
    weights_4 = [np.asarray(v.numpy()).reshape(-1).tolist() for v in variables]
    return {
        "label": label,
        "config": plain(keras.optimizers.serialize(opt)),
        "variables": [
            {"name": name, "shape": list(shape), "initial": plain(init.reshape(-1).tolist())}
            for (name, shape), init in zip(shapes.items(), initial)
        ],
        "gradients": [[plain(g.reshape(-1).tolist()) for g in step] for step in grads],
        "optimizer_variables_at_build": at_build,
        "optimizer_variables_after_3": after_3,
        "weights_after_3": plain(weights_3),
        "weights_after_4": plain(weights_4),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="conformance/interop")
    args = p.parse_args()
    generator = f"keras {keras.__version__}, backend {keras.backend.backend()}"
    print(generator)

    failures = 0
    rust = os.path.join(args.dir, "rust_configs.json")
    if os.path.exists(rust):
        failures = check_rust_configs(rust)
    else:
        print(f"{rust} not found: skipping (a)")

    with open(os.path.join(args.dir, "keras_configs.json"), "w") as f:
        json.dump({"generator": generator, "configs": keras_configs()}, f, indent=1)
        f.write("\n")

    cases = [
        weights_case(
            "constant_lr",
            lambda: keras.optimizers.Adafactor(learning_rate=0.05, name="adafactor"),
        ),
        weights_case(
            "schedule_ema_accumulation",
            lambda: keras.optimizers.Adafactor(
                learning_rate=schedules.ExponentialDecay(0.1, 2, 0.5),
                weight_decay=0.01,
                use_ema=True,
                ema_momentum=0.9,
                gradient_accumulation_steps=2,
                name="adafactor",
            ),
        ),
    ]
    with open(os.path.join(args.dir, "keras_weights.json"), "w") as f:
        json.dump({"generator": generator, "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"wrote {args.dir}/keras_configs.json and {args.dir}/keras_weights.json")
    if failures:
        print(f"{failures} Rust config documents did not round-trip through Keras")
        sys.exit(1)


if __name__ == "__main__":
    main()
