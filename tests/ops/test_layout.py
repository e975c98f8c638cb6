import pytest
import torch

from megatron_dsv.ops.layout import (
    check_divisible,
    cube_major_permutation,
    cube_major_positions,
    from_cube_major,
    group_size_of,
    inverse_permutation,
    to_cube_major,
)


@pytest.mark.parametrize("thw,cube", [((4, 8, 8), (2, 4, 4)), ((4, 8, 12), (4, 4, 4)), ((3, 5, 7), (2, 4, 4))])
def test_round_trip(thw, cube):
    n = thw[0] * thw[1] * thw[2]
    x = torch.randn(2, n, 5)
    y = to_cube_major(x, thw, cube, dim=1)
    assert not torch.equal(x, y)
    assert torch.equal(from_cube_major(y, thw, cube, dim=1), x)
    perm = cube_major_permutation(thw, cube)
    assert torch.equal(perm.sort().values, torch.arange(n))
    assert torch.equal(inverse_permutation(perm)[perm], torch.arange(n))


def test_groups_are_cubes():
    thw, cube = (4, 8, 8), (2, 4, 4)
    pos = cube_major_positions(thw, cube)  # [S, 3]
    g = group_size_of(cube)
    assert g == 32
    for grp in pos.view(-1, g, 3):
        # every contiguous run of G tokens spans exactly one 2x4x4 cube
        assert (grp.max(0).values - grp.min(0).values + 1).tolist() == list(cube)
        assert len({tuple(p.tolist()) for p in grp}) == g
    # positions are the raster coordinates of the permuted tokens
    t, h, w = thw
    raster = torch.arange(t * h * w)
    cm = to_cube_major(raster, thw, cube, dim=0)
    assert torch.equal(pos[:, 0] * h * w + pos[:, 1] * w + pos[:, 2], cm)


def test_partial_edge_cubes_keep_order_defined():
    pos = cube_major_positions((3, 5, 7), (2, 4, 4))
    assert pos.shape == (105, 3)
    # the first cube is full (2x4x4 = 32 tokens), all in t<2, h<4, w<4
    assert bool((pos[:32] < torch.tensor([2, 4, 4])).all())


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="multiple of the query-group cube"):
        check_divisible((3, 8, 8), (2, 4, 4))
    check_divisible((4, 8, 8), (2, 4, 4))
    with pytest.raises(ValueError, match="positive"):
        cube_major_permutation((4, 0, 8), (2, 4, 4))
    with pytest.raises(ValueError, match="tokens"):
        to_cube_major(torch.randn(1, 10), (4, 8, 8), (2, 4, 4))
