"""Shared fixtures: random HF / Meta checkpoints built once per test session."""

import os
import sys

import pytest

# tests import their helpers as top-level modules (``import models``)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """hf_model(name, dtype="float32", seed=0, max_shard_size=None) -> checkpoint dir (cached)."""
    built = {}

    def get(name: str, dtype: str = "float32", seed: int = 0, max_shard_size=None) -> str:
        key = (name, dtype, seed, max_shard_size)
        if key not in built:
            import models

            where = tmp_path_factory.mktemp(f"hf-{name}-{dtype}")
            built[key] = models.make_hf_model(where, name, dtype=dtype, seed=seed, max_shard_size=max_shard_size)
        return built[key]

    return get


@pytest.fixture(scope="session")
def meta_model(hf_model, tmp_path_factory):
    """meta_model(name, dtype="float32", seed=0) -> (meta_dir, hf_dir) of the same weights (cached)."""
    built = {}

    def get(name: str = "meta_compatible", dtype: str = "float32", seed: int = 0) -> tuple[str, str]:
        key = (name, dtype, seed)
        if key not in built:
            import models

            hf_dir = hf_model(name, dtype, seed)
            built[key] = (models.write_meta_checkpoint(hf_dir, tmp_path_factory.mktemp(f"meta-{name}-{dtype}")), hf_dir)
        return built[key]

    return get
