"""The latent memory (latent_knn): nearest-neighbour distances and the greedy coreset, against hand-worked cases."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from cavga.errors import ConfigError
from cavga.model import memory as memory_module
from cavga.model.memory import LatentMemory, greedy_coreset


def _as_map(vectors: np.ndarray, h: int, w: int) -> torch.Tensor:
    """(B * h * w, C) vectors as a (B, C, h, w) feature map, positions in row-major order."""
    c = vectors.shape[1]
    return torch.tensor(vectors, dtype=torch.float32).view(-1, h * w, c).transpose(1, 2).reshape(-1, c, h, w)


def test_distance_is_the_nearest_memory_vector_by_scipy():
    rng = np.random.default_rng(0)
    normal = rng.normal(size=(3 * 4 * 5, 6))
    memory = LatentMemory(6, size=100).fit([_as_map(normal, 4, 5)])  # fewer vectors than rows: all kept
    assert int(memory.n_vectors) == 60
    query = rng.normal(size=(2 * 4 * 5, 6))
    got = memory(_as_map(query, 4, 5)).numpy().reshape(2, -1)
    expected = cdist(query, normal).min(1).reshape(2, -1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # a normal vector itself is at distance 0 (up to float32 cancellation in |f|^2 - 2 f.b + |b|^2, then a sqrt)
    assert memory(_as_map(normal[:20], 4, 5)).abs().max() < 5e-3


def test_distances_span_blocks_of_the_memory(monkeypatch):
    monkeypatch.setattr(memory_module, "_CHUNK", 7)  # the minimum must be taken across blocks
    rng = np.random.default_rng(1)
    normal = rng.normal(size=(50, 3))
    memory = LatentMemory(3, size=50).fit([_as_map(normal, 5, 10)])
    query = rng.normal(size=(50, 3))
    got = memory(_as_map(query, 5, 10)).numpy().ravel()
    np.testing.assert_allclose(got, cdist(query, normal).min(1), rtol=1e-4, atol=1e-4)


def test_greedy_coreset_picks_the_farthest_point_each_time():
    # On a line at 0, 1, 2, 3, 10 starting from 0 (seeded start forced below): 10 is farthest, then 3 or the
    # midpoint-nearest... by hand: after {0, 10}, the distances to the nearest member are 1, 2, 3 -> 3 is next.
    points = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    start = int(torch.randint(5, (1,), generator=torch.Generator().manual_seed(0)))
    chosen = greedy_coreset(points, 3, seed=0).tolist()
    assert chosen[0] == start
    nearest = (points - points[start]).abs().ravel()
    second = int(nearest.argmax())
    assert chosen[1] == second
    nearest = torch.minimum(nearest, (points - points[second]).abs().ravel())
    assert chosen[2] == int(nearest.argmax())
    assert len(set(chosen)) == 3


def test_coreset_keeps_a_rare_normal_vector_that_most_vectors_are_far_from():
    # 999 vectors near the origin and one far away: a memory of 10 keeps the far one (a random 10 would not).
    rng = np.random.default_rng(2)
    vectors = rng.normal(scale=0.01, size=(1000, 4))
    vectors[417] = [5.0, 5.0, 5.0, 5.0]
    memory = LatentMemory(4, size=10).fit([_as_map(vectors, 10, 10)])
    assert int(memory.n_vectors) == 10
    assert memory(_as_map(vectors[417:418], 1, 1)).item() < 1e-4


def test_candidates_beyond_the_limit_are_a_seeded_sample(monkeypatch):
    monkeypatch.setattr(memory_module, "CANDIDATE_LIMIT", 30)
    rng = np.random.default_rng(3)
    vectors = _as_map(rng.normal(size=(100, 2)), 10, 10)
    a = LatentMemory(2, size=40).fit([vectors], seed=5)
    b = LatentMemory(2, size=40).fit([vectors], seed=5)
    assert int(a.n_vectors) == 30  # the 30 candidates, all kept, repeated to fill 40 rows
    assert torch.equal(a.bank, b.bank)


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="memory_size"):
        LatentMemory(3, size=0)
    memory = LatentMemory(3, size=4)
    with pytest.raises(ConfigError, match="at least one normal image"):
        memory.fit([])
    with pytest.raises(ConfigError, match=r"\(B, 3, h, w\)"):
        memory(torch.zeros(1, 2, 2, 2))


def test_leaving_an_image_out_ignores_exactly_its_own_rows():
    rng = np.random.default_rng(4)
    normal = rng.normal(size=(3, 4, 2, 2))  # three images of 2 x 2 positions, 4 channels
    memory = LatentMemory(4, size=64).fit([torch.tensor(normal[:2], dtype=torch.float32),
                                           torch.tensor(normal[2:], dtype=torch.float32)])  # fmt: skip
    assert sorted(memory.owner[: int(memory.n_vectors)].tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    features = torch.tensor(normal, dtype=torch.float32)
    got = memory(features, leave_out=torch.arange(3)).numpy().reshape(3, -1)
    vectors = normal.transpose(0, 2, 3, 1).reshape(3, 4, 4)  # (image, position, channel)
    for i in range(3):
        others = np.concatenate([vectors[j] for j in range(3) if j != i])
        np.testing.assert_allclose(got[i], cdist(vectors[i], others).min(1), rtol=1e-4, atol=1e-3)


# A 3 x 3 map of one channel holding 0..8 in row-major order, and the mean of each position's 3 x 3 block cut at
# the border, worked by hand: the corner (0, 0) holds {0, 1, 3, 4} -> 2, the edge (0, 1) {0..5} -> 2.5, the centre 4.
_GRID = torch.arange(9.0).view(1, 1, 3, 3)
_GRID_MEANS = np.array([[2.0, 2.5, 3.0], [3.5, 4.0, 4.5], [5.0, 5.5, 6.0]])


def test_a_window_compares_the_mean_of_each_block_worked_by_hand():
    memory = LatentMemory(1, size=4, window=3).fit([torch.zeros(1, 1, 3, 3)])  # every normal block means 0
    np.testing.assert_allclose(memory(_GRID).numpy()[0, 0], _GRID_MEANS, atol=1e-5)
    # window 1 is the position itself: the distance to 0 is the value
    plain = LatentMemory(1, size=4).fit([torch.zeros(1, 1, 3, 3)])
    np.testing.assert_allclose(plain(_GRID).numpy()[0, 0], _GRID.numpy()[0, 0], atol=1e-5)


def test_a_window_fills_the_memory_with_block_means():
    memory = LatentMemory(1, size=16, window=3).fit([_GRID])
    assert int(memory.n_vectors) == 9
    held = np.sort(memory.bank[:9, 0].numpy())
    np.testing.assert_allclose(held, np.sort(_GRID_MEANS.ravel()), atol=1e-6)
    assert memory(_GRID).abs().max() < 2e-3  # the normal map's own blocks are in the memory


def test_an_even_or_empty_window_is_refused():
    for window in (0, 2, -1):
        with pytest.raises(ConfigError, match="memory_window"):
            LatentMemory(1, window=window)


def test_both_scales_weights_the_window_half_to_the_positions_spread_worked_by_hand():
    # _GRID's values 0..8 have total variance 60 / 9; their 3 x 3 block means (_GRID_MEANS) 15 / 9: weight 2.
    memory = LatentMemory(1, size=16, window=3, both_scales=True).fit([_GRID])
    assert float(memory.window_weight) == pytest.approx(2.0, rel=1e-5)
    held = memory.bank[:9].numpy()
    expected = np.stack([_GRID.numpy().ravel(), 2.0 * _GRID_MEANS.ravel()], axis=1)
    np.testing.assert_allclose(held[np.lexsort(held.T[::-1])], expected[np.lexsort(expected.T[::-1])], atol=1e-5)
    # A query: every position's (own value, 2 x block mean) against the nine held pairs, by scipy.
    query = torch.tensor([[0.0, 8.0, 1.0], [2.0, 9.0, 4.0], [3.0, 3.0, 5.0]]).view(1, 1, 3, 3)
    q_means = torch.nn.functional.avg_pool2d(query, 3, stride=1, padding=1, count_include_pad=False)
    q = np.stack([query.numpy().ravel(), 2.0 * q_means.numpy().ravel()], axis=1)
    got = memory(query).numpy()[0, 0].ravel()
    np.testing.assert_allclose(got, cdist(q, expected).min(1), rtol=1e-4, atol=1e-3)


def test_both_scales_needs_a_window():
    with pytest.raises(ConfigError, match="memory_both_scales"):
        LatentMemory(1, window=1, both_scales=True)


def test_both_scales_weight_travels_with_the_state_dict():
    fitted = LatentMemory(1, size=16, window=3, both_scales=True).fit([_GRID])
    loaded = LatentMemory(1, size=16, window=3, both_scales=True)
    loaded.load_state_dict(fitted.state_dict())  # what a saved model's safetensors hold
    assert float(loaded.window_weight) == pytest.approx(2.0, rel=1e-5)
    query = _GRID.flip(-1) * 1.5
    np.testing.assert_allclose(loaded(query).numpy(), fitted(query).numpy(), atol=1e-6)


def test_two_memories_give_the_larger_distance_each_in_its_unit_worked_by_hand():
    from cavga.model.memory import two_memory_distance

    fine = LatentMemory(1, size=4).fit([torch.zeros(1, 1, 3, 3)])  # distance: the value itself
    coarse = LatentMemory(1, size=4, window=3).fit([torch.zeros(1, 1, 3, 3)])  # distance: the block's mean
    fine.unit.fill_(4.0)
    coarse.unit.fill_(0.5)
    got = two_memory_distance(fine, coarse, _GRID).numpy()[0, 0]
    # by hand: max(value / 4, block mean / 0.5); the block means 2..6 over 0.5 beat the values 0..8 over 4
    np.testing.assert_allclose(got, np.maximum(_GRID.numpy()[0, 0] / 4.0, _GRID_MEANS / 0.5), atol=1e-4)
    assert float(got[0, 0]) == pytest.approx(4.0, abs=1e-4)
    np.testing.assert_allclose(two_memory_distance(fine, None, _GRID).numpy(), fine(_GRID).numpy())  # one: as is


def test_a_coarse_memory_is_filled_with_its_unit_from_the_left_out_normal_scores():
    """fit_latent_memory fills both memories; each unit is the 95th percentile of what its memory alone scores its
    own images with their rows left out (checked against a model with that one memory, through the calibration
    path); the map is the larger scaled distance; refused windows."""
    from cavga.config import ModelConfig
    from cavga.engine import maps
    from cavga.engine.infer import fit_latent_memory, left_out_memory_scores
    from cavga.model.networks import build_model
    from test_weak import _Images

    def model(**options):
        torch.manual_seed(0)
        config = ModelConfig(variant="D", image_size=32, channels=3, width=8, latent_channels=4, **options)
        return build_model(config).eval()

    images = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    normals = _Images(images)
    both, fine_only, coarse_only = model(memory_coarse_window=3), model(), model(memory_window=3)
    for m in (both, fine_only, coarse_only):
        fit_latent_memory(m, normals, seed=0)
    for memory, alone in ((both.latent_memory, fine_only), (both.latent_memory_coarse, coarse_only)):
        expected = np.quantile(left_out_memory_scores(alone, normals), 0.95)
        assert float(memory.unit) == pytest.approx(expected, rel=1e-5)
        assert float(alone.latent_memory.unit) == 1.0  # one memory: no unit
    query = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mu = both(query, sample=False, decode=False).mu
        expected = torch.maximum(
            fine_only.latent_memory(mu) / both.latent_memory.unit,
            coarse_only.latent_memory(mu) / both.latent_memory_coarse.unit,
        )
        got = maps.latent_knn(both, both(query, sample=False, decode=False), query, query)
    torch.testing.assert_close(got, maps.upsampled_blur(expected, (32, 32)), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="memory_coarse_window"):
        ModelConfig(memory_window=3, memory_coarse_window=3).validate()
    with pytest.raises(ConfigError, match="memory_coarse_window"):
        ModelConfig(memory_coarse_window=4).validate()


def test_patch_features_average_each_level_then_meet_on_the_middle_grid_worked_by_hand():
    from cavga.model.memory import patch_features

    fine = torch.arange(16.0).view(1, 1, 4, 4)  # stride 4: 4 x 4
    middle = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)  # stride 8: 2 x 2
    coarse = torch.full((1, 1, 1, 1), 7.0)  # stride 16: 1 x 1
    got = patch_features({4: fine, 8: middle, 16: coarse}, pool=1)
    assert got.shape == (1, 3, 2, 2)
    # the fine level's 2 x 2 blocks averaged: top-left block 0, 1, 4, 5 -> 2.5
    np.testing.assert_allclose(got[0, 0].numpy(), [[2.5, 4.5], [10.5, 12.5]])
    np.testing.assert_allclose(got[0, 1].numpy(), middle[0, 0].numpy())
    np.testing.assert_allclose(got[0, 2].numpy(), np.full((2, 2), 7.0))
    # 3 x 3 pooling at the level's own resolution, the border averaged over the positions it holds:
    # on the 2 x 2 middle level every window holds all four values -> their mean 2.5
    pooled = patch_features({4: fine, 8: middle, 16: coarse}, pool=3)
    np.testing.assert_allclose(pooled[0, 1].numpy(), np.full((2, 2), 2.5))
    # the fine level's corner (0, 0): mean of 0, 1, 4, 5 (its 3 x 3 window cut at the border) = 2.5
    fine_pooled = torch.nn.functional.avg_pool2d(fine, 3, 1, 1, count_include_pad=False)
    assert float(fine_pooled[0, 0, 0, 0]) == 2.5
    np.testing.assert_allclose(pooled[0, 0].numpy(), torch.nn.functional.avg_pool2d(fine_pooled, 2)[0, 0].numpy())


def test_coreset_on_a_random_projection_still_takes_one_vector_of_each_far_cluster():
    rng = np.random.default_rng(3)
    centres = rng.normal(scale=50.0, size=(6, 300))  # wider than PROJECTION_DIM: selected on a projection
    points = np.concatenate([c + rng.normal(size=(40, 300)) for c in centres])
    chosen = greedy_coreset(torch.tensor(points, dtype=torch.float32), 6, seed=0).numpy()
    assert sorted(chosen // 40) == list(range(6))
    # and the projection is what ran: with it turned off the same clusters are found, by other members
    plain = greedy_coreset(torch.tensor(points, dtype=torch.float32), 6, seed=0, projection=0).numpy()
    assert sorted(plain // 40) == list(range(6))
