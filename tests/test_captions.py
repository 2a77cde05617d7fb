"""Multi-granularity caption sampling: seeded, weighted, and falling back when a text is missing."""

from collections import Counter

import numpy as np
import pytest

from tipslab.datamodules.captions import alt_caption, sample_caption
from tipslab.datamodules.transforms import mirror_text
from tipslab.errors import TipslabError

CAPS = {"alt": "red circle", "short": "A red circle.", "long": "A large solid red circle in the center."}


def draws(captions, n=2000, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return [sample_caption(captions, rng, **kw) for _ in range(n)]


def test_same_generator_seed_same_choices():
    assert draws(CAPS, 50, seed=4) == draws(CAPS, 50, seed=4)
    assert draws(CAPS, 50, seed=4) != draws(CAPS, 50, seed=5)


def test_text_matches_its_granularity():
    for granularity, text in draws(CAPS, 50):
        assert text == CAPS[granularity]


def test_uniform_by_default_and_weighted_by_probs():
    uniform = Counter(g for g, _ in draws(CAPS))
    assert set(uniform) == {"short", "long"}
    assert abs(uniform["long"] / 2000 - 0.5) < 0.05
    weighted = Counter(g for g, _ in draws(CAPS, granularities=("short", "long"), probs=[0.2, 0.8]))
    assert abs(weighted["long"] / 2000 - 0.8) < 0.04
    only_short = Counter(g for g, _ in draws(CAPS, 200, probs=[1.0, 0.0]))
    assert only_short == Counter({"short": 200})


def test_missing_granularity_falls_back_to_what_the_sample_has():
    no_short = {"alt": "red circle", "short": "", "long": "A big red circle."}
    assert {g for g, _ in draws(no_short, 100)} == {"long"}
    # Weight only on a missing granularity: the present one is used, not an error.
    assert {g for g, _ in draws(no_short, 20, probs=[1.0, 0.0])} == {"alt"}
    alt_only = {"alt": "red circle", "long": None}
    assert set(draws(alt_only, 20)) == {("alt", "red circle")}


def test_alt_text_falls_back_to_the_tersest_caption():
    rng = np.random.default_rng(0)
    assert alt_caption(CAPS, rng) == "red circle"
    assert alt_caption({"short": "A cat.", "long": "A cat on a mat."}, rng) == "A cat."
    assert alt_caption({"medium": "a dog"}, rng) == "a dog"  # a source's own granularity names


def test_no_text_at_all_names_the_sample():
    with pytest.raises(TipslabError, match="sample s42: has no caption"):
        sample_caption({"alt": " ", "short": None}, np.random.default_rng(0), sample_id="s42")


def test_a_list_of_captions_gives_one_of_them():
    caps = {"alt": ["red circle", "circle, red", "a red disc"], "short": ["One.", "Two."]}
    alts = Counter(alt_caption(caps, np.random.default_rng(i)) for i in range(300))
    assert set(alts) == set(caps["alt"])
    assert {t for _, t in draws(caps, 100, granularities=("short",))} == {"One.", "Two."}


@pytest.mark.parametrize("probs, message", [
    ([1.0], "2 caption_granularities"),
    ([0.5, -0.5], "non-negative"),
    ([0.0, 0.0], "positive sum"),
])
def test_bad_probs_raise(probs, message):
    with pytest.raises(TipslabError, match=message):
        sample_caption(CAPS, np.random.default_rng(0), ("short", "long"), probs)


def test_mirrored_captions_swap_left_and_right_only():
    text = "A red circle on the left; the red circle is left of the blue star. Right, bright."
    assert mirror_text(text) == "A red circle on the right; the red circle is right of the blue star. Left, bright."
    assert mirror_text(mirror_text(text)) == text
