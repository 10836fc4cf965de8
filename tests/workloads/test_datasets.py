import numpy as np
import pytest

from bouquet_workloads import datasets

SITES = ["a", "b", "c"]


def spec(**overrides):
    return {"name": "breast-cancer", "partitioning": "IID", "testFraction": 0.2, **overrides}


def test_breast_cancer_is_the_real_wisconsin_data():
    table = datasets.load("breast-cancer", seed=0)
    features, label = datasets.describe("breast-cancer")
    assert table.features.shape == (569, 30) and len(features) == 30
    assert label == "diagnosis" and features[0] == "mean_radius"
    assert np.bincount(table.labels).tolist() == [212, 357]  # malignant, benign


def test_split_holds_out_a_test_set_no_site_trains_on():
    split = datasets.split(spec(), SITES, seed=0)
    test_rows = {tuple(r) for r in split.test.features}
    assert len(split.test) == round(569 * 0.2)
    for share in split.sites.values():
        assert not test_rows & {tuple(r) for r in share.features}
    assert sum(len(s) for s in split.sites.values()) + len(split.test) == 569


def test_iid_shares_are_even_and_dirichlet_shares_are_skewed():
    iid = datasets.split(spec(), SITES, seed=0)
    skewed = datasets.split(spec(partitioning="Dirichlet", alpha=0.3), SITES, seed=0)
    assert max(len(s) for s in iid.sites.values()) - min(len(s) for s in iid.sites.values()) <= 1

    def benign_share(split):
        return [float(s.labels.mean()) for s in split.sites.values()]

    assert np.ptp(benign_share(skewed)) > np.ptp(benign_share(iid))
    assert all(len(s) >= datasets.MIN_ROWS_PER_SITE for s in skewed.sites.values())


def test_splits_repeat_for_a_seed():
    a = datasets.split(spec(partitioning="Dirichlet", alpha=0.5), SITES, seed=5)
    b = datasets.split(spec(partitioning="Dirichlet", alpha=0.5), SITES, seed=5)
    assert all(np.array_equal(a.sites[s].labels, b.sites[s].labels) for s in SITES)


def test_too_small_alpha_for_many_sites_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        datasets.partition(np.repeat([0, 1], 100), 20, "Dirichlet", alpha=0.001, seed=0)
    with pytest.raises(ValueError, match="cannot give 50 sites"):
        datasets.partition(np.zeros(100, dtype=int), 50, "IID", alpha=1, seed=0)


def test_sleep_quality_is_synthetic_deterministic_and_learnable():
    a, b = datasets.load("sleep-quality", seed=7), datasets.load("sleep-quality", seed=7)
    assert np.array_equal(a.features, b.features)
    assert not np.array_equal(a.features, datasets.load("sleep-quality", seed=8).features)
    assert a.features.shape[1] == len(datasets.describe("sleep-quality")[0])
    assert 0.3 < a.labels.mean() < 0.7
