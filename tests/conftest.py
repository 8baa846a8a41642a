import importlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import SCRIPTS, register_test_envs  # noqa: E402

register_test_envs()


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Every test runs in its own folder, so runs/, videos/ and wandb/ never land in the repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MUJOCO_GL", "egl")
    return tmp_path


@pytest.fixture(params=SCRIPTS)
def ppo(request):
    """Each of the three scripts, as a module."""
    return importlib.import_module(request.param)
