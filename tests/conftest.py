"""Fixtures: tiny SD-shaped models written in diffusers layout and loaded back through the same path as a real
checkpoint (``--model PATH``), a small procedural dataset, and a short fitted run. Nothing touches the network."""

import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from dyod.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd", prediction_type="epsilon", scheduler="pndm")


@pytest.fixture(scope="session")
def tiny_v_model(tmp_path_factory):
    from dyod.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction", scheduler="ddim", seed=1)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    from dyod.testing import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n=12, size=32)


@pytest.fixture(scope="session")
def fitted_run(tmp_path_factory, tiny_model, shapes):
    """A run with a (briefly) learned S* and a custom VAE, shared by the sampling tests."""
    import dyod

    out = tmp_path_factory.mktemp("runs") / "run"
    dyod.invert(shapes, tiny_model, out, dyod.InversionConfig(steps=5, batch_size=2, checkpoint_every=0), progress=False, device="cpu")
    dyod.train_vae(shapes, out, dyod.VAEConfig(epochs=2, batch_size=4, latent_dim=8), progress=False, device="cpu")
    return out


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raising KeyboardInterrupt, as Python sets it up when started from a terminal (started in the background
    of a non-interactive shell, as CI may start it, Python inherits SIGINT ignored)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


# the quick tier (`bash scripts/test.sh -m quick`): every test that builds no model (the math, seeding, configs, run
# folders, data reading, errors), less those marked slow (pre-training, the benchmark scripts, feature networks)
MODEL_FIXTURES = {"tiny_model", "tiny_v_model", "shapes", "fitted_run", "cli_run", "pipe", "holdout_run", "trained",
                  "served", "bundled_run", "atlas"}


def pytest_collection_modifyitems(items):
    for item in items:
        if not MODEL_FIXTURES & set(item.fixturenames) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.quick)


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("dyod").setLevel(logging.INFO)
