"""Shared fixtures: `tiny` on sys.path, one thread for torch, and each tiny model saved once per session."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import tiny  # noqa: E402

torch.set_num_threads(1)


def pytest_configure(config):
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # save_pretrained's bars would land in tests' captured stderr


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(name, **config_overrides) -> a saved tiny HF model directory (read-only by convention).

    "stories" is the real stories260K checkpoint in ../shared. Use `model_copy` to get one you may modify.
    """
    cache: dict[tuple, Path] = {}

    def get(name: str, **overrides) -> Path:
        if name == "stories":
            if not (tiny.STORIES / "config.json").is_file():
                pytest.skip(f"{tiny.STORIES} is not available")
            return tiny.STORIES
        key = (name, repr(sorted(overrides.items())))         # values may be lists (layer_types)
        if key not in cache:
            cache[key] = tiny.save(name, tmp_path_factory.mktemp(f"model-{name}"), **overrides)
        return cache[key]

    return get


@pytest.fixture
def model_copy(model_dir, tmp_path):
    """model_copy(name, **overrides) -> a private copy of a tiny model under this test's tmp_path."""

    def get(name: str, **overrides) -> Path:
        dst = tmp_path / f"src-{name}"
        shutil.copytree(model_dir(name, **overrides), dst)
        return dst

    return get
