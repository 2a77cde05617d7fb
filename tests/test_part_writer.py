"""The float16 part files of an index: split at image boundaries, written by a background thread
from two reused buffers, complete once `finish` returns, and a failed write is raised."""

import numpy as np
import pytest

from tipslab.retrieval.vector_store import PartWriter, VectorStore


def images(sizes, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, dim)).astype(np.float32) for n in sizes]


def test_parts_split_at_image_boundaries_and_hold_every_vector(tmp_path):
    sizes = [3, 4, 2, 5, 1, 6, 3, 3]
    vectors = images(sizes)
    writer = PartWriter(tmp_path / "vectors", first_part=7, part_rows=8)
    for v in vectors:
        writer.add(v)
    writer.finish()
    # 3+4 | 2+5+1 | 6 | 3+3: a part closes before the image that would overflow it.
    assert [p["rows"] for p in writer.parts] == [7, 8, 6, 6]
    assert [p["file"] for p in writer.parts] == [f"vectors/part-{i:05d}.npy" for i in (7, 8, 9, 10)]
    store = VectorStore(tmp_path, writer.parts, 4)
    expected = np.concatenate(vectors).astype(np.float16)
    np.testing.assert_array_equal(store.take(np.arange(sum(sizes))), expected.astype(np.float32))
    assert len(writer.buffers) == 2  # four parts through two buffers, reused
    assert not list((tmp_path / "vectors").glob("*.tmp"))


def test_an_image_larger_than_a_part_gets_a_part_of_its_own(tmp_path):
    vectors = images([2, 11, 3])
    writer = PartWriter(tmp_path / "vectors", first_part=0, part_rows=8)
    for v in vectors:
        writer.add(v)
    writer.finish()
    assert [p["rows"] for p in writer.parts] == [2, 11, 3]
    store = VectorStore(tmp_path, writer.parts, 4)
    np.testing.assert_array_equal(store.take(np.arange(16)), np.concatenate(vectors).astype(np.float16).astype(np.float32))


def test_a_failed_write_is_raised_to_the_caller(tmp_path):
    writer = PartWriter(tmp_path / "vectors", first_part=0, part_rows=4)
    writer.add(images([4])[0])
    (tmp_path / "vectors").rmdir()  # the folder is gone: the background write fails
    with pytest.raises(FileNotFoundError):
        writer.finish()
