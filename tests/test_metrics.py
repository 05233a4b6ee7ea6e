import math

import numpy as np
import pytest

from mapray import metrics


def test_margins_and_map_forms_by_hand():
    m_ex = metrics.explicit_margin([5.0, 2.0, 1.0], [1.0, 3.0, 1.0])
    assert m_ex.tolist() == [4.0, -1.0, 0.0]
    # simpo: beta * logp / |y|
    r_c = metrics.implicit_reward("simpo", 2.0, [-10.0, -4.0, -6.0], [5, 2, 3])
    r_r = metrics.implicit_reward("simpo", 2.0, [-2.0, -12.0, -6.0], [1, 4, 2])
    assert r_c.tolist() == [-4.0, -4.0, -4.0]
    assert r_r.tolist() == [-4.0, -6.0, -6.0]
    m_im = r_c - r_r  # [0, 2, 2]
    assert metrics.map_score(m_ex, m_im, 1.0).tolist() == [4.0, -1.0, -2.0]
    assert metrics.map_score(m_ex, m_im, 2.5).tolist() == [4.0, -4.0, -5.0]
    # unregularised: m_ex - alpha * m_im (a pair the policy already prefers the wrong way scores high)
    assert metrics.map_unregularised(m_ex, -m_im, 1.0).tolist() == [4.0, 1.0, 2.0]


def test_dpo_implicit_reward_needs_reference():
    r = metrics.implicit_reward("dpo", 0.1, [-10.0, -20.0], [3, 4], ref_logps=[-12.0, -15.0])
    assert r == pytest.approx([0.2, -0.5])
    with pytest.raises(ValueError, match="reference"):
        metrics.implicit_reward("dpo", 0.1, [-1.0], [1])


def test_moments_merge_equals_whole_pool_and_population_std():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, 1001)
    merged = metrics.Moments()
    for part in np.array_split(x, 7):
        merged = merged.merge(metrics.Moments.of(part))
    assert merged.count == 1001
    assert merged.mean == pytest.approx(x.mean(), rel=1e-12)
    assert merged.std == pytest.approx(x.std(ddof=0), rel=1e-12)
    # by hand: [1, 2, 3, 4] -> mean 2.5, population variance 1.25
    m = metrics.Moments.of([1.0, 2.0]).merge(metrics.Moments.of([3.0, 4.0]))
    assert (m.count, m.mean, m.std) == (4, 2.5, math.sqrt(1.25))


def test_map_z_by_hand_and_constant_column():
    m_ex = np.array([1.0, 2.0, 3.0, 4.0])  # mean 2.5, std sqrt(1.25)
    m_im = np.array([-2.0, 0.0, 2.0, 0.0])  # |.| = [2, 0, 2, 0]: mean 1, std 1
    pool = metrics.PoolMoments.of(m_ex, m_im)
    s = math.sqrt(1.25)
    expected = [(1 - 2.5) / s - 1.0, (2 - 2.5) / s + 1.0, (3 - 2.5) / s - 1.0, (4 - 2.5) / s + 1.0]
    assert metrics.map_z(m_ex, m_im, 1.0, pool) == pytest.approx(expected)
    # a constant |m_im| (policy == reference under DPO) z-scores to 0: ranking by m_ex alone
    pool0 = metrics.PoolMoments.of(m_ex, np.zeros(4))
    assert metrics.map_z(m_ex, np.zeros(4), 1.0, pool0) == pytest.approx((m_ex - 2.5) / s)


def test_selection_count_and_top_k_ties():
    assert metrics.selection_count(10, "ratio", 0.4) == 4
    assert metrics.selection_count(9, "ratio", 0.4) == 3  # floor, like int(len * ratio)
    assert metrics.selection_count(5, "top_k", 7) == 5
    assert metrics.selection_count(9, "top_k", 7) == 7
    with pytest.raises(ValueError, match="not a ranking rule"):
        metrics.selection_count(9, "threshold", 0.5)
    mask = metrics.top_k_mask(np.array([1.0, 3.0, 3.0, 2.0]), ["d", "c", "b", "a"], 2)
    assert mask.tolist() == [False, True, True, False]
    mask = metrics.top_k_mask(np.array([1.0, 3.0, 3.0, 2.0]), ["d", "c", "b", "a"], 1)
    assert mask.tolist() == [False, False, True, False]  # tie broken by the smaller pair_id


def test_selection_scores_per_metric():
    cols = {"map_z": np.array([0.5, -1.0]), "map": np.array([1.0, 2.0]), "map_unreg": np.array([3.0, 0.0]),
            "explicit_margin": np.array([2.0, 1.0]), "implicit_margin": np.array([-3.0, 1.0]),
            "pair_id": ["a", "b"]}
    assert metrics.selection_score("implicit_margin_small", cols).tolist() == [-3.0, -1.0]
    assert metrics.selection_score("explicit_margin", cols).tolist() == [2.0, 1.0]
    assert metrics.selection_score("map_unreg", cols).tolist() == [3.0, 0.0]
    with pytest.raises(ValueError, match="unknown selection metric 'mapp'"):
        metrics.selection_score("mapp", cols)
    r1 = metrics.selection_score("random", cols, seed=1)
    assert r1.tolist() == metrics.selection_score("random", {"pair_id": ["a", "b"]}, seed=1).tolist()
    assert r1.tolist() != metrics.selection_score("random", cols, seed=2).tolist()
    assert ((r1 >= 0) & (r1 < 1)).all()


def test_map_forms_share_one_alpha():
    m_ex, m_im = np.array([4.0, -1.0, 0.0, 3.0]), np.array([0.0, 2.0, -2.0, 1.0])
    pool = metrics.PoolMoments.of(m_ex, m_im)  # m_ex: mean 1.5, var 4.25; |m_im| = [0, 2, 2, 1]: mean 1.25, var 0.6875
    forms = metrics.map_forms(m_ex, m_im, 0.5, pool)
    assert forms["map"].tolist() == [4.0, 0.0, -1.0, 2.5]  # |m_ex| - 0.5 |m_im|
    assert forms["map_unreg"].tolist() == [4.0, -2.0, 1.0, 2.5]  # m_ex - 0.5 m_im
    z_ex = (m_ex - 1.5) / math.sqrt(4.25)
    z_im = (np.array([0.0, 2.0, 2.0, 1.0]) - 1.25) / math.sqrt(0.6875)
    assert forms["map_z"] == pytest.approx(z_ex - 0.5 * z_im, abs=1e-12)
