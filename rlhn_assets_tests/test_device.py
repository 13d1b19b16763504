"""Device choice (lib/embeddings.resolve_device): CUDA, then MPS, then CPU; a setting or RLHN_DEVICE overrides it;
no stage hard-codes the CPU."""

import subprocess
from pathlib import Path

import pytest
import torch

from rlhn_assets.lib import embeddings
from rlhn_assets.lib.embeddings import resolve_device

ROOT = Path(__file__).resolve().parents[1]


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.delenv("RLHN_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device(None) == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"


def test_setting_and_environment_override(monkeypatch):
    monkeypatch.setenv("RLHN_DEVICE", "cuda:1")
    assert resolve_device("auto") == "cuda:1"  # the environment sets the default ...
    assert resolve_device("cpu") == "cpu"  # ... an explicit setting wins
    with pytest.raises(ValueError, match="gpu0"):
        resolve_device("gpu0")


def test_models_load_on_the_resolved_device(monkeypatch):
    monkeypatch.delenv("RLHN_DEVICE", raising=False)
    model = embeddings.load_model(device="auto")  # no GPU on the test machine: auto resolves to the CPU
    assert str(model.device) == resolve_device("auto")


def test_no_hard_coded_cpu_device():
    hits = subprocess.run(["grep", "-rn", 'device="cpu"', str(ROOT / "rlhn_assets")], capture_output=True, text=True)
    assert hits.stdout == "", hits.stdout
