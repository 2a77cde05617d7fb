"""The patch-text heatmaps (training pictures, `tipslab eval`) score patches as search does:
cosine to the label minus mean cosine to the background prompts."""

import torch
import torch.nn.functional as F

from tipslab.modules.encoder import build_encoder
from tipslab.modules.tokenizers import build_tokenizer
from tipslab.platform.config import load_config
from tipslab.platform.pictures import patch_text_heatmaps
from tipslab.retrieval.search import NULL_PROMPTS


def test_heatmaps_are_relative_to_the_background_prompts():
    cfg = load_config("tipsv2_tiny", ["model.vision.img_size=56", "model.text.context_length=16"])
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model).eval()
    tokenizer = build_tokenizer(**cfg.model.tokenizer)
    images = torch.rand(1, 3, 56, 56)
    maps = patch_text_heatmaps(encoder, tokenizer, images, [["red circle", "blue star"]])
    with torch.no_grad():
        patches = F.normalize(encoder.encode_image(images, dense=True).patches[0], dim=-1)  # [16, D]
        text = F.normalize(encoder.encode_text(tokenizer(["red circle", "blue star"])), dim=-1)
        nulls = F.normalize(encoder.encode_text(tokenizer(list(NULL_PROMPTS))), dim=-1)
    # The map is the score grid upsampled bilinearly; pooled back to the grid it follows the scores.
    for j in range(2):
        expected = (patches @ text[j] - (patches @ nulls.T).mean(dim=1)).reshape(4, 4)
        got = F.adaptive_avg_pool2d(torch.from_numpy(maps[0][j])[None, None], 4)[0, 0]
        raw = (patches @ text[j]).reshape(4, 4)
        corr = torch.corrcoef(torch.stack([got.flatten(), expected.flatten(), raw.flatten()]))
        assert corr[0, 1] > 0.9 and corr[0, 1] > corr[0, 2] + 0.2  # measured 0.96 vs 0.34
