"""Region retrieval through the real index + search path, scored against the scenes' boxes."""

from types import SimpleNamespace

import pytest
import torch

from tipslab.platform.eval_regions import box_iou, evaluate_regions, recall_of_hits


def test_box_iou_and_recall_from_known_hits():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    truth = {"red circle": {"a": [(0, 0, 10, 10)]}, "blue star": {"b": [(20, 20, 30, 30)]}}

    def hit(query, key, box):
        return SimpleNamespace(query=query, image_key=key, box=box)

    hits = [
        [hit("red circle", "b", (0, 0, 10, 10)), hit("red circle", "a", (1, 1, 10, 10))],  # right at rank 2
        [hit("blue star", "b", (20, 20, 26, 26))],  # IoU 0.36 < 0.5: never found
    ]
    assert recall_of_hits(hits, truth, ks=(1, 2)) == {"R@1": 0.0, "R@2": 50.0}


class ColourOracle(torch.nn.Module):
    """A model whose right answers are known by construction (not a stand-in for the code under
    test): patch features say how close each patch's colour is to each scene colour, and a text
    is the one-hot of the colour word it contains."""

    def __init__(self):
        super().__init__()
        from tipslab.datamodules.scenes import COLOURS

        self.refs = torch.nn.Parameter(torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255.0,
                                       requires_grad=False)
        self.embed_dim = len(COLOURS)
        self.logit_scale = torch.nn.Parameter(torch.log(torch.tensor([1 / 0.07])), requires_grad=False)

    def encode_image(self, images, dense=True):
        pooled = torch.nn.functional.avg_pool2d(images, 14)
        b, _, h, w = pooled.shape
        pix = pooled.permute(0, 2, 3, 1).reshape(b, h * w, 3)
        closeness = torch.exp(-8 * torch.cdist(pix, self.refs.expand(b, -1, -1)))
        return SimpleNamespace(patches=closeness, grid=(h, w), cls1=closeness.mean(1), cls2=closeness.mean(1))

    def encode_text(self, ids):
        return ids.float()


def _oracle_loaded():
    from tipslab.datamodules.scenes import COLOURS
    from tipslab.modules.api import LoadedModel, Preprocess

    colours = list(COLOURS)

    def tokenizer(texts):  # the one-hot of the colour word; a text with none (background prompts): zeros
        return torch.stack([
            torch.nn.functional.one_hot(torch.tensor(colours.index(c)), len(colours)) if c is not None
            else torch.zeros(len(colours), dtype=torch.long)
            for c in (next((c for c in colours if c in t), None) for t in texts)])

    return LoadedModel(encoder=ColourOracle(), tokenizer=tokenizer, preprocess=Preprocess(112), model_cfg={})


def test_an_oracle_finds_the_queried_objects_in_exact_and_compressed_indexes(tmp_path):
    out = evaluate_regions(_oracle_loaded(), num_images=24, image_size=112, seed=0, factories=("Flat", "SQ4"),
                           ks=(1, 5), workdir=tmp_path)
    assert out["queries"] > 10
    # The oracle knows colours, not shapes: "red circle" also finds red squares, so it is far
    # from 100 but far above chance (measured with random query vectors, not assumed).
    assert out["Flat"]["R@5"] > 20 > 2 * out["chance"]["R@5"]
    assert out["SQ4"]["R@5"] > 20
    assert (tmp_path / "index-Flat" / "manifest.json").is_file()
