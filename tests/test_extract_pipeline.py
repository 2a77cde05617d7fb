"""The extraction pipeline: the plan chosen by device, and the GPU plan's code path (bf16
autocast, float16 results, prefetch thread) run on the CPU against the plain float32 forward."""

import numpy as np
import pytest
import torch

from tipslab.errors import TipslabError
from tipslab.retrieval.extract import SourceImage, embed_images, extract_patches
from tipslab.retrieval.extract_pipeline import ExtractionPlan, plan_for

TINY = {"vision": {"size": "tiny", "img_size": 112, "drop_path_rate": 0.0},
        "text": {"size": "tiny", "vocab_size": 49408, "context_length": 32},
        "tokenizer": {"kind": "bpe", "path": None, "context_length": 32}, "temperature": 0.07}


@pytest.fixture(scope="module")
def encoder():
    from tipslab.modules.encoder import build_encoder

    torch.manual_seed(0)
    return build_encoder(TINY).eval()


def images(n, size=112):
    generator = torch.Generator().manual_seed(1)
    return [SourceImage(key=f"k{i}", path=None, size=(size, size), pixels=torch.rand(3, size, size, generator=generator))
            for i in range(n)]


def test_cpu_plan_is_float32_and_equals_the_plain_forward(encoder):
    plan = plan_for("cpu")
    assert (plan.autocast, plan.pinned, plan.host_dtype, plan.batch_size) == (False, False, torch.float32, 16)
    assert plan_for("cpu", 5).batch_size == 5
    source = images(7)
    records = list(extract_patches(encoder, iter(source), batch_size=3, progress=False))
    assert [r.image.key for r in records] == [f"k{i}" for i in range(7)]  # order kept across batches
    expected, grid = embed_images(encoder, torch.stack([s.pixels for s in source]))
    assert all(r.grid == grid and r.vectors.dtype == np.float32 for r in records)
    np.testing.assert_allclose(np.stack([r.vectors for r in records]), expected.numpy(), atol=1e-5)


def test_gpu_plan_path_gives_float16_vectors_close_to_float32(encoder):
    gpu_like = ExtractionPlan(torch.device("cpu"), autocast=True, pinned=False, host_dtype=torch.float16, batch_size=4)
    source = images(6)
    records = list(extract_patches(encoder, iter(source), plan=gpu_like, progress=False))
    assert len(records) == 6 and all(r.vectors.dtype == np.float16 for r in records)
    expected = embed_images(encoder, torch.stack([s.pixels for s in source]))[0].numpy()
    got = np.stack([r.vectors for r in records]).astype(np.float32)
    cosine = (got * expected).sum(-1) / np.linalg.norm(got, axis=-1)
    assert cosine.min() > 0.98  # bf16 compute: close, not equal
    assert not np.array_equal(got, expected)  # the bf16 path really ran


def test_errors_in_the_stream_surface_and_stop_the_prefetch(encoder):
    mixed = images(2) + images(2, size=56)
    with pytest.raises(TipslabError, match="one preprocessed shape per batch"):
        list(extract_patches(encoder, iter(mixed), batch_size=4, progress=False))

    def broken():
        yield from images(3)
        raise TipslabError("source went away")

    with pytest.raises(TipslabError, match="source went away"):
        list(extract_patches(encoder, broken(), batch_size=2, progress=False))
    # a consumer that stops early does not hang on the prefetch thread
    stream = extract_patches(encoder, iter(images(40)), batch_size=2, progress=False)
    assert next(stream).image.key == "k0"
    stream.close()
