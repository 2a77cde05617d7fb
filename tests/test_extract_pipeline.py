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


def test_a_folder_decoded_in_worker_processes_gives_the_same_records(encoder, tmp_path):
    from PIL import Image

    from tipslab.retrieval.extract import open_source

    generator = np.random.default_rng(3)
    for i, size in enumerate([(120, 90), (64, 64), (200, 150), (90, 120), (50, 80)]):
        Image.fromarray(generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "2b.png").write_bytes(b"not a png")
    runs = []
    for workers in (0, 2):
        source = open_source(tmp_path, 112, shard=(1, 2), workers=workers)
        with pytest.warns(UserWarning, match="2b.png"):
            records = list(extract_patches(encoder, source, batch_size=2, progress=False))
        runs.append((records, source.skipped))
    (here, skipped_here), (there, skipped_there) = runs
    # Sorted: 0 1 2 2b 3 4; rank 1 of 2 keeps places 1, 3, 5: 1.png, 2b.png (unreadable), 4.png.
    assert [(r.image.key, r.image.size, r.image.position) for r in there] == \
        [(r.image.key, r.image.size, r.image.position) for r in here] == \
        [(str(tmp_path / "1.png"), (64, 64), 1), (str(tmp_path / "4.png"), (50, 80), 5)]
    np.testing.assert_allclose(np.stack([r.vectors for r in there]), np.stack([r.vectors for r in here]), atol=1e-6)
    assert skipped_here == skipped_there == [{"path": str(tmp_path / "2b.png"), "reason": skipped_here[0]["reason"]}]


def test_scenes_drawn_in_worker_processes_are_the_scenes_drawn_here():
    from tipslab.retrieval.extract import open_source

    here = list(open_source("scenes:val:21", 56, shard=(2, 3), workers=0))
    there = list(open_source("scenes:val:21", 56, shard=(2, 3), workers=2))
    assert [(i.key, i.position) for i in there] == [(i.key, i.position) for i in here]
    assert [i.position for i in here] == list(range(2, 21, 3))
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(here, there))
    assert len({float(i.pixels.sum()) for i in here}) == len(here)  # different scenes, not one repeated


def test_stats_count_the_batches_and_the_wait_for_a_slow_source(encoder):
    import time

    from tipslab.retrieval.extract_pipeline import ExtractionStats

    def slow(source):
        for image in source:
            time.sleep(0.05)  # a decoder slower than the model
            yield image

    stats = ExtractionStats()
    records = list(extract_patches(encoder, slow(images(6)), batch_size=4, progress=False, stats=stats))
    assert len(records) == 6 and (stats.batches, stats.images) == (2, 6)
    # 0.3 s of decoding, of which the forward of two small batches hides little: most is waiting.
    assert 0.1 < stats.data_wait_s < 5 and stats.device_wait_s == 0.0  # the CPU forward runs inline


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA plan (copy stream, pinned buffers) needs a GPU")
def test_on_a_gpu_many_batches_of_uint8_come_back_in_order_and_close_to_the_cpu(encoder):
    # The copy stream hands batch i out while i+1 computes: a race would mix batches up here.
    generator = torch.Generator().manual_seed(2)
    source = [SourceImage(key=f"k{i}", path=None, size=(112, 112),
                          pixels=torch.randint(0, 256, (3, 112, 112), dtype=torch.uint8, generator=generator))
              for i in range(37)]
    gpu = encoder.to("cuda")
    try:
        plan = plan_for("cuda", 4)
        assert (plan.autocast, plan.pinned, plan.host_dtype) == (True, True, torch.float16)
        records = list(extract_patches(gpu, iter(source), plan=plan, progress=False))
    finally:
        encoder.to("cpu")
    assert [r.image.key for r in records] == [s.key for s in source]
    expected = embed_images(encoder, torch.stack([s.pixels for s in source]).float() / 255)[0].numpy()
    got = np.stack([r.vectors for r in records]).astype(np.float32)
    assert ((got * expected).sum(-1) / np.linalg.norm(got, axis=-1)).min() > 0.98
