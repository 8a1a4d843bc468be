"""Shared fixtures: the tiny scenes data set is generated once per test session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def tiny_scenes(tmp_path_factory):
    """A tiny scenes benchmark with real CNN region features (a few seconds to generate)."""
    from itmatch.data.scenes import generate_scenes, preset_sizes

    out = tmp_path_factory.mktemp("scenes") / "tiny"
    n_train, n_dev, n_test = preset_sizes("tiny")
    generate_scenes(out, seed=0, n_train=n_train, n_dev=n_dev, n_test=n_test)
    return out


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Nothing a test does may write into the user's .cache or runs/ folders."""
    monkeypatch.setenv("ITMATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
