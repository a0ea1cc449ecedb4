"""runtime/scatter.py: index_put_ (accumulate=False) as one Triton kernel, against torch's own
index_put_ on the same inputs (exact: it only moves values)."""
import fxforge  # noqa: F401  (first: Triton's interpreter without CUDA)
import pytest
import torch
from fxforge.runtime.scatter import index_put_, plan

CASES = {  # name -> (dst shape, indices builder, values shape)
    "kv_cache_rows_pos": ((3, 2, 11, 5), lambda: [torch.tensor([[0], [2]]), None, torch.tensor([4, 9])], (2, 2, 2, 5)),
    "single_dim": ((7, 3), lambda: [torch.tensor([6, 0, 3])], (3, 3)),
    "adjacent_pair": ((4, 5, 6), lambda: [None, torch.tensor([1, 4]), torch.tensor([0, 5])], (4, 2)),
    "negative_index": ((4, 6), lambda: [None, torch.tensor([-1, -6])], (4, 2)),
    "broadcast_values": ((2, 8, 3), lambda: [None, torch.tensor([2, 5, 7])], (3,)),
    "int32_index": ((5, 4), lambda: [torch.tensor([4, 1], dtype=torch.int32)], (2, 4)),
    "three_indices": ((3, 4, 5, 2), lambda: [torch.tensor([0, 2]), torch.tensor([3, 1]), torch.tensor([4, 0]), None], (2, 2)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_index_put_matches_torch(name, dtype):
    shape, make, vshape = CASES[name]
    torch.manual_seed(0)
    dst = torch.randn(shape).to(dtype)
    idx, vals = make(), torch.randn(vshape).to(dtype)
    assert plan(dst, idx, vals) is not None
    ref = torch.ops.aten.index_put_.default(dst.clone(), idx, vals)
    out = index_put_(dst, idx, vals)
    assert out is dst and torch.equal(dst, ref)


def test_strided_destination_and_values():
    base = torch.randn(2, 4, 9, 6)
    vals = torch.randn(3, 2, 3).transpose(0, 1)  # non-contiguous values [2, 3, 3], broadcast over the 7 rows
    idx = [None, torch.tensor([0, 3, 2])]
    ref_base = base.clone()
    torch.ops.aten.index_put_.default(ref_base[:, :, 1:8, ::2], idx, vals[:, :, None, :].expand(2, 3, 7, 3))
    dst = base[:, :, 1:8, ::2]  # a non-contiguous view is written through
    index_put_(dst, idx, vals[:, :, None, :].expand(2, 3, 7, 3))
    assert torch.equal(base, ref_base)


def test_out_of_range_index_writes_nothing_and_other_cases_use_aten():
    dst = torch.zeros(4, 3)
    index_put_(dst, [torch.tensor([1, 9])], torch.ones(2, 3))
    assert dst[1].eq(1).all() and dst.sum() == 3
    acc = torch.zeros(4)
    index_put_(acc, [torch.tensor([1, 1])], torch.ones(2), accumulate=True)  # ATen path
    assert acc[1] == 2
    mask = torch.tensor([True, False, True, False])
    m = torch.zeros(4)
    index_put_(m, [mask], torch.tensor(5.0))  # bool mask: ATen path
    assert torch.equal(m, torch.tensor([5.0, 0, 5.0, 0]))
