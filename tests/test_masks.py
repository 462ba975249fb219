"""Tests for latentkit.masks: every expectation is built independently with explicit Python loops."""

import pytest
import torch

from latentkit.masks import (
    MaskSpec,
    causal_mask,
    full_mask,
    hide_spans_outside_latents,
    packed_documents,
    with_padding,
)


def dense_from_rule(n: int, allowed) -> torch.Tensor:
    """[1, 1, n, n] bool mask from a predicate allowed(row, col)."""
    return torch.tensor([[allowed(i, j) for j in range(n)] for i in range(n)]).view(1, 1, n, n)


def dense_from_intervals_loop(spec: MaskSpec) -> torch.Tensor:
    b_, n = spec.batch_size, spec.num_keys
    out = torch.zeros(b_, 1, n, n, dtype=torch.bool)
    iv = spec.intervals.tolist()
    for b in range(b_):
        for i in range(n):
            for j in range(n):
                s1, e1, s2, e2 = iv[b][j]
                hidden = s1 <= i < e1 or s2 <= i < e2 or (spec.causal and j > i)
                out[b, 0, i, j] = not hidden
    return out


def random_spec(b: int, n: int, causal: bool, seed: int) -> MaskSpec:
    g = torch.Generator().manual_seed(seed)
    return MaskSpec(causal, torch.randint(0, n + 1, (b, n, 4), generator=g, dtype=torch.int32))


# --- MaskSpec basics --------------------------------------------------------------------------------


def test_causal_to_dense_is_tril():
    spec = causal_mask(3, 7)
    assert spec.batch_size == 3 and spec.num_keys == 7
    expected = torch.tril(torch.ones(7, 7, dtype=torch.bool)).expand(3, 1, 7, 7)
    assert torch.equal(spec.to_dense(), expected)
    assert spec.to_dense().dtype == torch.bool and spec.to_dense().shape == (3, 1, 7, 7)


def test_full_mask_is_all_true():
    assert torch.equal(full_mask(2, 5).to_dense(), torch.ones(2, 1, 5, 5, dtype=torch.bool))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_to_dense_matches_loop_reference(causal, seed):
    spec = random_spec(2, 9, causal, seed)
    assert torch.equal(spec.to_dense(), dense_from_intervals_loop(spec))


def test_known_intervals_by_hand():
    # column 1 hidden from rows [2, 4), column 3 hidden from rows [0, 1) and [4, 5); non-causal
    iv = torch.zeros(1, 5, 4, dtype=torch.int32)
    iv[0, 1] = torch.tensor([2, 4, 0, 0])
    iv[0, 3] = torch.tensor([0, 1, 4, 5])
    dense = MaskSpec(False, iv).to_dense()[0, 0]
    expected = torch.ones(5, 5, dtype=torch.bool)
    expected[2, 1] = expected[3, 1] = False
    expected[0, 3] = expected[4, 3] = False
    assert torch.equal(dense, expected)


def test_empty_interval_when_start_not_below_end():
    iv = torch.zeros(1, 4, 4, dtype=torch.int32)
    iv[0, 0] = torch.tensor([3, 1, 2, 2])
    assert torch.equal(MaskSpec(False, iv).to_dense(), torch.ones(1, 1, 4, 4, dtype=torch.bool))


@pytest.mark.parametrize(
    "spec",
    [
        causal_mask(2, 8),
        random_spec(2, 8, True, 3),
        random_spec(2, 8, False, 4),
        hide_spans_outside_latents([[(1, 3, 4, 6)], []], 8),
    ],
)
@pytest.mark.parametrize("nq", [0, 1, 3, 8])
def test_fewer_queries_are_last_rows(spec, nq):
    full = spec.to_dense()
    part = spec.to_dense(num_queries=nq)
    assert part.shape == (2, 1, nq, 8)
    assert torch.equal(part, full[:, :, 8 - nq :, :])


def test_num_queries_out_of_range():
    with pytest.raises(ValueError, match="num_queries"):
        causal_mask(1, 4).to_dense(num_queries=5)


def test_select_and_truncate_consistent_with_to_dense():
    spec = random_spec(4, 10, True, 5)
    full = spec.to_dense()
    assert torch.equal(spec.select(slice(1, 3)).to_dense(), full[1:3])
    assert torch.equal(spec.select(torch.tensor([3, 0])).to_dense(), full[[3, 0]])
    assert torch.equal(spec.select(torch.tensor([False, True, False, True])).to_dense(), full[[1, 3]])
    assert spec.select(torch.tensor([2])).batch_size == 1
    for m in (0, 1, 6, 10):
        t = spec.truncate(m)
        assert t.num_keys == m and t.causal
        assert all(0 <= v <= m for v in t.intervals.flatten().tolist())
        assert torch.equal(t.to_dense(), full[:, :, :m, :m])
        assert torch.equal(t.to_dense(min(m, 2)), full[:, :, m - min(m, 2) : m, :m])
    # one-sample reference: select then truncate
    assert torch.equal(spec.select(slice(2, 3)).truncate(7).to_dense(), full[2:3, :, :7, :7])
    with pytest.raises(ValueError, match="num_keys"):
        spec.truncate(11)


def test_to_device_keeps_content():
    spec = random_spec(1, 5, False, 6)
    moved = spec.to("cpu")
    assert isinstance(moved, MaskSpec) and moved.causal is False
    assert torch.equal(moved.intervals, spec.intervals)


def test_validation_errors():
    with pytest.raises(ValueError, match="int32"):
        MaskSpec(True, torch.zeros(1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        MaskSpec(True, torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="shape"):
        MaskSpec(True, torch.zeros(1, 4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="key_is_valid"):
        with_padding(causal_mask(1, 4), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_is_valid"):
        with_padding(causal_mask(1, 4), torch.ones(1, 4, dtype=torch.int64))


# --- padding -----------------------------------------------------------------------------------------


def test_with_padding_left_and_right():
    n = 6
    valid = torch.tensor([[True, True, True, True, False, False], [False, False, True, True, True, True]])
    spec = with_padding(causal_mask(2, n), valid)
    dense = spec.to_dense()
    right = dense_from_rule(n, lambda i, j: j <= i and j < 4)
    left = dense_from_rule(n, lambda i, j: j <= i and j >= 2)
    assert torch.equal(dense[0:1], right)
    assert torch.equal(dense[1:2], left)
    # left-pad rows see nothing at all: fully masked
    assert not dense[1, 0, 0].any() and not dense[1, 0, 1].any()
    assert spec.intervals[1, 0].tolist() == [0, n, 0, 0]


def test_with_padding_non_causal():
    valid = torch.tensor([[False, True, True, False]])
    dense = with_padding(full_mask(1, 4), valid).to_dense()
    assert torch.equal(dense, dense_from_rule(4, lambda i, j: j in (1, 2)))


# --- packed documents ----------------------------------------------------------------------------------


def doc_ids(lengths: list[int], n: int) -> list[int]:
    ids = [d for d, length in enumerate(lengths) for _ in range(length)]
    return ids + [-1] * (n - len(ids))  # -1 = padding


def test_packed_documents_causal():
    n = 10
    lengths = [[3, 4, 2], [5, 2]]
    dense = packed_documents(lengths, n).to_dense()
    for b, ls in enumerate(lengths):
        ids = doc_ids(ls, n)
        expected = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            for j in range(n):
                expected[i, j] = ids[j] != -1 and ids[i] == ids[j] and j <= i
        assert torch.equal(dense[b, 0], expected), b
    # explicit block-diagonal check for row 0: doc 2 = positions 7, 8
    assert dense[0, 0, 8].tolist() == [False] * 7 + [True, True, False]
    assert not dense[0, 0, 9].any()  # trailing padding row is fully masked


def test_packed_documents_non_causal():
    n = 8
    lengths = [[2, 3], [4, 4]]
    dense = packed_documents(lengths, n, causal=False).to_dense()
    for b, ls in enumerate(lengths):
        ids = doc_ids(ls, n)
        expected = dense_from_rule(n, lambda i, j, ids=ids: ids[j] != -1 and ids[i] == ids[j])[0, 0]
        assert torch.equal(dense[b, 0], expected), b
    assert dense[0, 0, 0].tolist() == [True, True] + [False] * 6
    assert dense[0, 0, 2].tolist() == [False, False, True, True, True, False, False, False]


def test_packed_documents_too_long():
    with pytest.raises(ValueError, match="sample 1"):
        packed_documents([[2], [3, 3]], 5)


# --- spans seen only by their latent blocks (Monet stage 2) --------------------------------------


def test_hide_spans_outside_latents_two_spans_by_hand():
    # text [0,2) | aux image 1 [2,5) | text [5,6) | latent 1 [6,9) | observation [9,11)
    # | aux image 2 [11,13) | latent 2 [13,15) | text [15,20)
    n = 20
    img1, lat1, img2 = range(2, 5), range(6, 9), range(11, 13)

    def allowed(i, j):
        if j > i:
            return False
        if j in img1 and (5 <= i < 6 or i >= 9):  # between image 1 and its latents, or after them
            return False
        # image 2 is directly followed by its latents [13,15): hidden only after them
        return not (j in img2 and i >= 15)

    spec = hide_spans_outside_latents([[(2, 5, 6, 9), (11, 13, 13, 15)]], n)
    assert spec.causal
    dense = spec.to_dense()
    assert torch.equal(dense, dense_from_rule(n, allowed))
    d = dense[0, 0]
    assert d[3, 2] and not d[3, 4]  # image rows see their own image causally
    assert not d[5, 2] and d[5, 1]  # text between image and latents: image hidden, prompt visible
    assert all(d[7, j] for j in img1)  # latent block sees its image
    assert not any(d[9, j] for j in img1) and all(d[9, j] for j in lat1)  # observation: via latents only
    assert all(d[12, j] for j in img2) and not any(d[12, j] for j in img1)
    assert all(d[14, j] for j in img2)
    row = d[19]
    assert row.tolist() == [j not in img1 and j not in img2 for j in range(n)]


def test_hide_spans_outside_latents_batch_with_padding():
    n = 14
    # sample 0: right padding from 12; blocks image [1,3) latent [4,6), image [7,9) latent [9,11)
    # sample 1: left padding [0,3); one block image [4,7) latent [8,10)
    blocks = [[(1, 3, 4, 6), (7, 9, 9, 11)], [(4, 7, 8, 10)]]
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[0, 12:] = False
    valid[1, :3] = False
    dense = hide_spans_outside_latents(blocks, n, key_is_valid=valid).to_dense()

    def allowed0(i, j):
        if j > i or j >= 12:
            return False
        if j in (1, 2) and (i == 3 or i >= 6):
            return False
        return not (j in (7, 8) and i >= 11)

    def allowed1(i, j):
        if j > i or j < 3:
            return False
        return not (j in (4, 5, 6) and (i == 7 or i >= 10))

    assert torch.equal(dense[0:1], dense_from_rule(n, allowed0))
    assert torch.equal(dense[1:2], dense_from_rule(n, allowed1))
    assert not dense[1, 0, :3].any()  # left-pad rows fully masked
    # a sample without blocks is plain causal
    assert torch.equal(hide_spans_outside_latents([[]], 5).to_dense(), causal_mask(1, 5).to_dense())


@pytest.mark.parametrize(
    "blocks, match",
    [
        ([[(2, 5, 4, 9)]], "sample 0, block 0"),  # image overlaps its latent block
        ([[(5, 2, 6, 9)]], "sample 0, block 0"),  # image end before start
        ([[(0, 1, 2, 3)], [(2, 5, 6, 9), (4, 5, 10, 12)]], "sample 1, block 1"),  # blocks out of order
        ([[(2, 5, 6, 21)]], "sample 0, block 0"),  # past num_keys
        ([[(-1, 5, 6, 9)]], "sample 0, block 0"),  # negative
    ],
)
def test_hide_spans_outside_latents_rejects_bad_spans(blocks, match):
    with pytest.raises(ValueError, match=match):
        hide_spans_outside_latents(blocks, 20)
