"""Mask statistics against the spec numbers (§5.1-§5.3)."""
import numpy as np
import pytest

from d2v.modalities.image import BlockMaskConfig, block_mask
from d2v.modalities.speech import SpanMaskConfig, span_mask
from d2v.modalities.text import TokenMaskConfig, Vocabulary, mask_tokens


# ---------------------------------------------------------------- BEiT block masking


def test_block_mask_hits_120_of_196_patches_with_valid_blocks():
    rng = np.random.default_rng(0)
    cfg = BlockMaskConfig()
    counts = []
    for _ in range(300):
        blocks = []
        mask = block_mask((14, 14), cfg, rng, blocks)
        counts.append(mask.sum())
        covered = np.zeros((14, 14), dtype=bool)
        for top, left, h, w in blocks:
            assert h < 14 and w < 14  # spec: require h < 14 and w < 14
            assert 0 <= top <= 14 - h and 0 <= left <= 14 - w
            covered[top : top + h, left : left + w] = True
        assert (covered == mask).all()  # the mask is exactly the union of the accepted blocks
    counts = np.array(counts)
    assert counts.max() <= 120  # never more than the target
    # BEiT gives up after 10 failed attempts, so small leftovers (< min block) are sometimes not filled
    assert 118.5 < counts.mean() <= 120 and np.mean(counts == 120) > 0.5
    assert abs(counts.mean() / 196 - 0.61) < 0.01  # ~61 % of the patches, spec §13


def test_block_aspect_ratio_and_area_bounds():
    rng = np.random.default_rng(1)
    cfg = BlockMaskConfig()
    areas, ratios = [], []
    for _ in range(200):
        blocks = []
        block_mask((14, 14), cfg, rng, blocks)
        for _, _, h, w in blocks[:1]:  # the first block is drawn with the whole budget available
            areas.append(h * w)
            ratios.append(h / w)
    ratios = np.array(ratios)
    # sqrt(area*r) rounding widens the [0.3, 3.33] ratio range slightly for small blocks
    assert ratios.min() >= 0.3 * 0.6 and ratios.max() <= (1 / 0.3) / 0.6
    assert min(areas) >= 16 * 0.6  # min block 16 patches (less rounding)


def test_block_mask_is_a_function_of_the_rng():
    a = block_mask((14, 14), BlockMaskConfig(), np.random.default_rng(7))
    b = block_mask((14, 14), BlockMaskConfig(), np.random.default_rng(7))
    c = block_mask((14, 14), BlockMaskConfig(), np.random.default_rng(8))
    assert (a == b).all() and (a != c).any()


# ---------------------------------------------------------------- wav2vec 2.0 span masking


def test_span_mask_equal_counts_and_ratio():
    rng = np.random.default_rng(0)
    cfg = SpanMaskConfig()
    fracs = []
    for _ in range(50):
        lengths = rng.integers(200, 500, size=8).tolist()
        mask = span_mask(lengths, 500, cfg, rng)
        per_row = mask.sum(1)
        assert (per_row == per_row[0]).all()  # require_same_masks
        for row, n in zip(mask, lengths):
            assert not row[n:].any()  # never in padding
        fracs.append(per_row[0] / min(lengths))
    # ~49 % of frames for overlapping spans (spec §5.1); the equal-count rule trims rows to the batch minimum
    assert 0.40 < np.mean(fracs) < 0.55


def test_span_mask_single_utterance_matches_spec_fraction():
    rng = np.random.default_rng(3)
    fracs = [span_mask([1000], 1000, SpanMaskConfig(), rng).mean() for _ in range(200)]
    expected = 1 - np.exp(-0.65)  # Poisson approximation of 65 spans of 10 per 1000 frames: ~0.48
    assert abs(np.mean(fracs) - expected) < 0.02


def test_span_mask_spans_are_ten_frames_without_subsampling():
    rng = np.random.default_rng(5)
    mask = span_mask([300], 300, SpanMaskConfig(require_same_masks=False), rng)[0]
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0])))[::2]
    assert (runs >= 10).all() and (runs % 1 == 0).all()  # overlapping spans merge into runs of >= 10


# ---------------------------------------------------------------- RoBERTa dynamic masking

VOCAB = Vocabulary(size=1000)


def _tokens(rng, batch=64, length=128, pad_from=100):
    t = rng.integers(VOCAB.num_special, VOCAB.size - 1, size=(batch, length))
    t[:, 0], t[:, pad_from - 1], t[:, pad_from:] = VOCAB.bos, VOCAB.eos, VOCAB.pad
    return t


def test_text_masking_15_percent_80_10_10():
    rng = np.random.default_rng(0)
    tokens = _tokens(rng, batch=400)
    corrupted, selected, masked = mask_tokens(tokens, VOCAB, TokenMaskConfig(), rng)
    candidates = ~np.isin(tokens, VOCAB.special_ids)
    assert not selected[~candidates].any()  # special and padding tokens are never selected
    assert (corrupted[~candidates] == tokens[~candidates]).all()
    assert abs(selected.sum() / candidates.sum() - 0.15) < 0.005
    sel = selected.sum()
    to_mask = (corrupted == VOCAB.mask) & selected
    kept = (corrupted == tokens) & selected
    randomised = selected & ~to_mask & ~kept
    assert (to_mask == masked).all()
    assert abs(to_mask.sum() / sel - 0.8) < 0.02
    # a random replacement can by chance draw the original token (p ~ 1/995): counts as kept
    assert abs(kept.sum() / sel - 0.1) < 0.015 and abs(randomised.sum() / sel - 0.1) < 0.015
    assert not np.isin(corrupted[randomised], VOCAB.special_ids).any()


def test_text_masking_is_dynamic():
    tokens = _tokens(np.random.default_rng(0), batch=4)
    a = mask_tokens(tokens, VOCAB, TokenMaskConfig(), np.random.default_rng([0, 1]))[1]
    b = mask_tokens(tokens, VOCAB, TokenMaskConfig(), np.random.default_rng([0, 2]))[1]
    assert (a != b).any()  # a new mask each time the sample is drawn


def test_text_span_variant():
    rng = np.random.default_rng(0)
    tokens = _tokens(rng, batch=200)
    cfg = TokenMaskConfig(prob=0.35, length=4, leave_unmasked_prob=0.0, random_token_prob=0.0)
    corrupted, selected, masked = mask_tokens(tokens, VOCAB, cfg, rng)
    assert (masked == selected).all()  # no random / kept tokens
    frac = selected.sum() / (~np.isin(tokens, VOCAB.special_ids)).sum()
    assert 0.22 < frac < 0.35  # overlapping spans of 4 from p=0.35 starts/len


def test_invalid_mask_config_is_rejected():
    with pytest.raises(ValueError, match="leave_unmasked_prob"):
        TokenMaskConfig(leave_unmasked_prob=0.6, random_token_prob=0.6)
    with pytest.raises(ValueError):
        SpanMaskConfig(prob=1.5)
