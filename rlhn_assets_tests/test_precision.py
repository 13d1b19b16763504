"""Inference/training precision: "auto" resolves per hardware, bf16 embeddings stay close to fp32 and never share
a cache entry with them (lib/embeddings.py PRECISIONS)."""

import numpy as np
import pytest

from rlhn_assets.lib import embeddings
from rlhn_assets.lib.embeddings import encode_cached, resolve_precision


def test_resolve_precision(monkeypatch):
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("bf16") == "bf16"
    monkeypatch.setattr(embeddings, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(embeddings, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "mps") == "fp32"  # no bf16 autocast path measured there
    with pytest.raises(ValueError, match="precision 'fp16'"):
        resolve_precision("fp16")  # fp16 mixed precision: CUDA only
    with pytest.raises(ValueError, match="precision 'fp16'"):
        resolve_precision("fp16", "mps")
    assert resolve_precision("fp16", "cuda:1") == "fp16"
    with pytest.raises(ValueError, match="precision 'fp8'"):
        resolve_precision("fp8")


def test_bf16_embeddings_close_to_fp32_and_cached_apart(tmp_path):
    model = embeddings.load_model()
    texts = [
        "Vitamin D deficiency is associated with multiple sclerosis.",
        "The mitochondrial genome encodes 13 proteins of the respiratory chain.",
        "Aspirin reduces the risk of colorectal cancer in long-term users.",
    ]
    fp32, hit = encode_cached(model, "v", texts, tmp_path, precision="fp32")
    assert not hit
    bf16, hit = encode_cached(model, "v", texts, tmp_path, precision="bf16")
    assert not hit, "a bf16 encoding must not be served from the fp32 cache entry"
    assert bf16.dtype == np.float32
    cos = (fp32 * bf16).sum(axis=1)
    assert cos.min() > 0.999, cos
    assert not np.array_equal(fp32, bf16)  # it really ran in bf16
    again, hit = encode_cached(model, "v", texts, tmp_path, precision="bf16")
    assert hit and np.array_equal(again, bf16)
    assert len(list(tmp_path.glob("*.npy"))) == 2
