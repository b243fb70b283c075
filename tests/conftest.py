"""Shared pytest setup and fixtures.

Reference oracle (see ``tests/reference.py``): the reference implementation ``sam2==1.1.0`` is a
test-only dependency. Tests that need it get it through the fixtures below, which import it lazily:
collection works without it. Without it those tests are skipped, unless the environment variable
``NAPARI_SAM2_REQUIRE_REFERENCE=1`` is set (``.ci/run`` sets it): then a missing reference is a hard
test failure, so CI cannot go green by skipping the parity tests.

Fixtures
--------
require_reference          -> None    skip / fail when the reference cannot be imported
reference_factory(name, seed=0) -> (model, checkpoint_path), cached per session
ref_tiny21                 -> (model, checkpoint_path) for "sam2.1_hiera_tiny", seed 0
ref_tiny20                 -> (model, checkpoint_path) for "sam2_hiera_tiny", seed 0
reference_ckpt_dir         -> pathlib.Path, session temp dir holding the checkpoints
random_checkpoint          -> pathlib.Path, sam2.1_hiera_tiny with untrained weights (seed 0),
                              official layout; no reference needed

The cached models are shared by all tests of a session: do not modify their weights (deep-copy
first if you must).
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

SEED = 0
REQUIRE_REFERENCE_ENV = "NAPARI_SAM2_REQUIRE_REFERENCE"

# NAPARI_SAM2_TEST_THREADS=1 keeps parallel test runs from oversubscribing the 2 cores
torch.set_num_threads(int(os.environ.get("NAPARI_SAM2_TEST_THREADS", "2")))
torch.manual_seed(SEED)
np.random.seed(SEED)
random.seed(SEED)


def _reference_required() -> bool:
    return os.environ.get(REQUIRE_REFERENCE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _reference_import_error() -> str | None:
    """None when the reference (sam2 + its hydra configs) is importable, else why not."""
    try:
        import hydra  # noqa: F401
        import iopath  # noqa: F401
        import sam2  # noqa: F401
        import sam2.modeling.sam2_base  # noqa: F401
        import sam2.sam2_video_predictor  # noqa: F401
    except Exception as e:  # ImportError, or hydra failing to initialise
        return f"{type(e).__name__}: {e}"
    return None


def _need_reference() -> None:
    err = _reference_import_error()
    if err is None:
        return
    msg = (
        f"reference implementation sam2==1.1.0 not importable ({err}). Install it with: "
        "pip install hydra-core iopath && "
        "SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0"
    )
    if _reference_required():
        pytest.fail(f"{msg} [{REQUIRE_REFERENCE_ENV} is set: parity tests may not be skipped]",
                    pytrace=False)
    pytest.skip(msg)


def _need_reference_training() -> None:
    """The reference's ``training`` package (loss, SAM2Train): shipped inside sam2==1.1.0, importable
    once its own dependencies are there."""
    _need_reference()
    try:
        import training.loss_fns  # noqa: F401
        import training.model.sam2  # noqa: F401
    except Exception as e:
        msg = (f"the reference's training package is not importable ({type(e).__name__}: {e}). Install its "
               "dependencies: pip install --no-deps tensordict pyvers orjson cloudpickle importlib_metadata "
               "&& pip install tensorboard")
        if _reference_required():
            pytest.fail(f"{msg} [{REQUIRE_REFERENCE_ENV} is set: parity tests may not be skipped]", pytrace=False)
        pytest.skip(msg)


@pytest.fixture
def require_reference_training():
    _need_reference_training()


# the suite's exact comparisons are fp32 on every machine; tests of bf16 ask for it by name
os.environ["NAPARI_SAM2_PRECISION"] = "fp32"
# never the user's feature cache, also in the CLIs the tests start (their environments copy this one)
_FEATURES = tempfile.mkdtemp(prefix="napari-sam2-test-features-")
atexit.register(shutil.rmtree, _FEATURES, True)
os.environ["NAPARI_SAM2_FEATURES"] = _FEATURES


@pytest.fixture(autouse=True)
def _own_feature_cache(tmp_path_factory, monkeypatch):
    """Each test has a feature cache of its own (never the user's, never another test's entries)."""
    monkeypatch.setenv("NAPARI_SAM2_FEATURES", str(tmp_path_factory.mktemp("features")))


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same RNG state, whatever ran before it."""
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    random.seed(SEED)
    yield


@pytest.fixture
def require_reference() -> None:
    """Skip (or fail, under NAPARI_SAM2_REQUIRE_REFERENCE=1) when sam2==1.1.0 is missing."""
    _need_reference()


@pytest.fixture(scope="session")
def reference_ckpt_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reference_ckpts")


@pytest.fixture(scope="session")
def reference_factory(reference_ckpt_dir):
    """``factory(name, seed=0, image_size=None) -> (reference model, official-layout checkpoint path)``.

    Built once per (name, seed, image_size) per session (``image_size`` None: the official 1024). ``name``: "sam2_hiera_tiny", "sam2.1_hiera_tiny",
    ... "_small", "_base_plus", "_large".
    """
    cache: dict[tuple[str, int], tuple[torch.nn.Module, Path]] = {}

    def factory(name: str, seed: int = 0, image_size: int | None = None) -> tuple[torch.nn.Module, Path]:
        _need_reference()
        key = (name, int(seed), image_size)
        if key not in cache:
            from reference import build_reference, save_official_checkpoint

            model = build_reference(name, seed, image_size=image_size)
            size = "" if image_size is None else f"_{image_size}"
            path = save_official_checkpoint(
                model, reference_ckpt_dir / f"{name}_seed{int(seed)}{size}.pt"
            )
            cache[key] = (model, path)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def ref_tiny21(reference_factory):
    """(reference SAM2VideoPredictor, checkpoint path) for sam2.1_hiera_tiny, seed 0."""
    return reference_factory("sam2.1_hiera_tiny", 0)


@pytest.fixture(scope="session")
def ref_tiny20(reference_factory):
    """(reference SAM2VideoPredictor, checkpoint path) for sam2_hiera_tiny, seed 0."""
    return reference_factory("sam2_hiera_tiny", 0)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    """sam2.1_hiera_tiny with untrained weights, in the official layout (shared by the test files)."""
    from napari_sam2.build import build_model

    path = tmp_path_factory.getbasetemp() / "random_sam2.1_hiera_tiny.pt"
    if not path.exists():
        torch.manual_seed(0)
        model = build_model("sam2.1_hiera_tiny", pretrained=False)
        tmp = path.with_suffix(".partial")
        torch.save({"model": model.state_dict()}, tmp)
        os.replace(tmp, path)
    return path
