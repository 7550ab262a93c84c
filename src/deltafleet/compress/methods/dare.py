"""DARE (Yu et al., "Language Models are Super Mario", ICML 2024, arXiv:2311.03099, Sec. 3): drop delta entries
at random with rate p and rescale the survivors by 1/(1-p), stored sparse (CSR) within the byte budget.

The budget fixes the number kept, k = `budget.sparse_nnz(out, in, budget)`, so instead of a Bernoulli mask
exactly k entries are drawn uniformly without replacement (p = 1 - k / (out * in)); the draw is seeded per
projection. A matrix whose budget cannot hold its CSR row pointers and one entry (k = 0: SmolLM2's 49152-row
table below about 1/200 of the whole delta) keeps nothing: its delta is dropped, as the pipeline allows. The
result is an export/merge baseline: the engine does not serve sparse deltas.
"""

from __future__ import annotations

import torch

from deltafleet.adapters import Adapter
from deltafleet.adapters.qlowrank import shape_key
from deltafleet.adapters.sparse import SparseConfig, index_dtype
from deltafleet.compress.budget import sparse_nnz
from deltafleet.compress.delta import DeltaSet
from deltafleet.compress.methods.base import CompressSettings, Context, Method, register_method
from deltafleet.models.config import PROJECTIONS, TABLES


def dare_sparsify(delta: torch.Tensor, nnz: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """delta (out, in) -> CSR params: values (nnz,) fp16 (rescaled), cols (nnz,), row_ptr (out + 1,) int32."""
    out_f, in_f = delta.shape
    n = out_f * in_f
    flat = torch.randperm(n, generator=generator)[:nnz].sort().values
    rows, cols = flat // in_f, flat % in_f
    row_ptr = torch.zeros(out_f + 1, dtype=torch.int32)
    row_ptr[1:] = torch.bincount(rows, minlength=out_f).cumsum(0)
    scale = n / nnz if nnz else 0.0
    values = (delta.reshape(-1)[flat].float() * scale).half()
    return {"values": values, "cols": cols.to(index_dtype(in_f)), "row_ptr": row_ptr}


class Dare(Method):
    name = "dare"
    servable = False

    def compress(self, ds: DeltaSet, s: CompressSettings, ctx: Context) -> Adapter:
        nnz = tuple((shape_key(o, i), sparse_nnz(o, i, b)) for (o, i), b in sorted(ds.shape_budgets(s.ratio).items()))
        cfg = SparseConfig(targets=PROJECTIONS, nnz=nnz)
        params = {}
        for (layer, proj), delta in ds.deltas.items():
            index = (layer * len(PROJECTIONS) + PROJECTIONS.index(proj) if proj in PROJECTIONS
                     else -1 - TABLES.index(proj))  # a table: its own stream
            g = torch.Generator().manual_seed(s.seed * 1_000_003 + index)
            nnz_m = cfg.count(*delta.shape)
            if nnz_m > 0:  # else not even the row pointers fit the budget: the module's delta is dropped
                params[(layer, proj)] = dare_sparsify(delta, nnz_m, g)
            ctx.tick()
        return Adapter(cfg, params)


register_method(Dare())
