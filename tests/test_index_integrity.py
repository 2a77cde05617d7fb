"""A damaged index directory: every file truncated, emptied or replaced by garbage in turn gives
one line naming the file (exit 2 from the CLI), never a traceback; and delete by image id."""

import json
import re

import numpy as np
import pytest
import torch
from test_index_dir import DIM, MODEL, records

from tipslab.errors import TipslabError
from tipslab.platform.cli import main
from tipslab.retrieval.index_dir import IndexDirectory, write_index

TINY = {"vision": {"size": "tiny", "img_size": 112, "drop_path_rate": 0.0},
        "text": {"size": "tiny", "vocab_size": 49408, "context_length": 32},
        "tokenizer": {"kind": "bpe", "path": None, "context_length": 32}, "temperature": 0.07}
FILES = ("manifest.json", "index.faiss", "images.parquet", "metadata.parquet", "vectors/part-00000.npy")


def damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":  # same size: the recorded size cannot tell
        path.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    else:
        path.write_bytes(b"junk")


def use_everything(path):
    index = IndexDirectory.open(path)
    index.search_vectors(np.ones((1, DIM), dtype=np.float32), 3)
    assert len(index.metadata) == index.num_vectors
    index.image_vectors(index.num_images - 1)


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "junk"])
@pytest.mark.parametrize("name", FILES + (".commit.json",))
def test_every_damaged_file_is_one_line_naming_it(tmp_path, name, how):
    build_dir = tmp_path / "idx"
    write_index(records(4), build_dir, factory="IVF2,Flat", image_size=28, model=MODEL, progress=False,
                train_size=24)
    use_everything(build_dir)  # intact: fine
    target = build_dir / name
    if name == ".commit.json":
        target.write_text('{"renames": {"index.faiss": "index.faiss.pending"}}')
    damage(target, how)
    with pytest.raises(TipslabError) as caught:
        use_everything(build_dir)
    message = str(caught.value)
    assert "\n" not in message and name in message


def test_wrong_typed_manifest_fields_are_named(tmp_path):
    write_index(records(2), tmp_path / "idx", image_size=28, model=MODEL, progress=False)
    manifest_path = tmp_path / "idx" / "manifest.json"
    good = json.loads(manifest_path.read_text())
    for key, value, expected in [("vectors", {"parts": "part-00000.npy"}, "vectors.parts"),
                                 ("vectors", {"parts": [{"file": 3, "rows": 6}]}, "vectors.parts[0]"),
                                 ("dim", "8", "'dim'"), ("counts", {"images": -1, "vectors": 12}, "counts.images"),
                                 ("preprocessing", [], "'preprocessing'"), ("deleted", [0.5], "'deleted'"),
                                 ("search_params", 16, "search_params")]:
        manifest_path.write_text(json.dumps({**good, key: value}))
        with pytest.raises(TipslabError, match=re.escape(expected)):
            IndexDirectory.open(tmp_path / "idx")
    manifest_path.write_text(json.dumps(good))
    IndexDirectory.open(tmp_path / "idx")


def test_cli_exit_2_and_one_line_for_each_damaged_file(tmp_path, capsys):
    from tipslab.modules.checkpoint import save_checkpoint
    from tipslab.modules.encoder import build_encoder

    torch.manual_seed(0)
    model = save_checkpoint(build_encoder(TINY), TINY, tmp_path / "tiny")
    assert main(["index", str(model), "scenes:val:2", "--out", str(tmp_path / "idx"), "--quiet"]) == 0
    pristine = {name: (tmp_path / "idx" / name).read_bytes() for name in FILES}
    assert main(["search", str(tmp_path / "idx"), "red circle", "--no-png", "--k", "1"]) == 0
    capsys.readouterr()
    for name in FILES:
        for how in ("truncated", "garbage"):
            damage(tmp_path / "idx" / name, how)
            assert main(["search", str(tmp_path / "idx"), "red circle", "--no-png"]) == 2, (name, how)
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and name in err, (name, how, err)
            (tmp_path / "idx" / name).write_bytes(pristine[name])


def test_add_delete_search_reopen(tmp_path):
    index = write_index(records(3), tmp_path / "idx", image_size=28, model=MODEL, progress=False)
    index.add_records(records(5)[3:], progress=False)
    target = records(5)[4].vectors[:1]  # image 4's first patch: its own best match
    assert index.image_ids_of(index.search_vectors(target, 1)[1])[0, 0] == 4

    assert index.delete([4, 1]) == 2
    assert index.delete([1]) == 0  # already deleted
    for opened in (index, IndexDirectory.open(tmp_path / "idx")):  # the live object and a fresh open agree
        assert opened.deleted == [1, 4]
        scores, ids = opened.search_vectors(target, opened.num_vectors)
        found = set(opened.image_ids_of(ids[ids >= 0]).tolist())
        assert found == {0, 2, 3} and (ids >= 0).sum() == 3 * 6  # every live vector, none of the deleted
        assert np.all(np.diff(scores[0][ids[0] >= 0]) <= 1e-6)  # still best first
    with pytest.raises(TipslabError, match="not in"):
        index.delete([5])
    # adding a deleted image's file again indexes it anew under a new id
    counts = IndexDirectory.open(tmp_path / "idx").add_records(records(5)[4:], progress=False)
    assert counts["added"] == 1
    reopened = IndexDirectory.open(tmp_path / "idx")
    assert reopened.num_images == 6 and reopened.image_ids_of(reopened.search_vectors(target, 1)[1])[0, 0] == 5


KILLED_BUILD = """
import sys, time
sys.path.insert(0, sys.argv[2])
from test_index_dir import MODEL, records
from tipslab.retrieval.index_dir import write_index

def slow():
    for i, record in enumerate(records(400)):
        if i == 5:
            print("extracting", flush=True)
        time.sleep(0.01)
        yield record

write_index(slow(), sys.argv[1], image_size=28, model=MODEL, progress=False, overwrite=True)
"""


def test_sigkill_during_a_rebuild_leaves_the_last_committed_index(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    write_index(records(3), tmp_path / "idx", image_size=28, model=MODEL, progress=False)
    before = IndexDirectory.open(tmp_path / "idx").search_vectors(records(3)[1].vectors[:1], 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(tmp_path / "idx"), str(Path(__file__).parent)],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "extracting"  # mid-extraction, parts being written
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    index = IndexDirectory.open(tmp_path / "idx")
    assert index.num_images == 3
    after = index.search_vectors(records(3)[1].vectors[:1], 2)
    np.testing.assert_array_equal(before[1], after[1])
    assert list(tmp_path.glob(".idx.building-*"))  # the killed build's leftovers sit beside, not inside


def test_cli_index_delete_by_id_and_path(tmp_path, capsys):
    write_index(records(4), tmp_path / "idx", image_size=28, model=MODEL, progress=False)
    assert main(["index-delete", str(tmp_path / "idx"), "0", "/data/img2.png"]) == 0
    assert "deleted 2 image(s)" in capsys.readouterr().out
    assert IndexDirectory.open(tmp_path / "idx").deleted == [0, 2]
    assert main(["index-delete", str(tmp_path / "idx"), "/data/nope.png"]) == 2
    assert "nope.png" in capsys.readouterr().err
    assert main(["index-delete", str(tmp_path / "idx"), "9"]) == 2
