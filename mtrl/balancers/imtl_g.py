"""IMTL-G: impartial multi-task learning (gradient part)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtrl.balancers.base import Balancer
from mtrl.balancers.registry import register


@register
class IMTLG(Balancer):
    """IMTL-G: the direction ``d = Gᵀα`` with ``Σα = 1`` whose projections onto all unit
    task gradients are equal, ``d·u_i = d·u_j`` (``u_i = g_i/|g_i|``).

    Gramian form: ``(Aα)_i = t·|g_i|`` for all i, so ``α ∝ A⁺ n`` with ``n_i = |g_i|``,
    normalised to sum 1. For a full-rank Gramian this is exactly the paper's closed form
    ``α_{2:K} = g_1 Uᵀ (D Uᵀ)⁻¹`` (D: differences ``g_1 − g_i``, U: differences of unit
    vectors); for a singular one we take the minimum-norm least-squares solution.

    Paper: Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task
    Learning", ICLR 2021. The authors released no code; the reference implementation is
    ``IMTLG`` in https://github.com/AvivNavon/nash-mtl (``methods/weight_methods.py``,
    reused by Aligned-MTL's SamsungLabs/MTL), which uses the closed form above.

    Defaults: none. Scale: weights sum to 1 (mean scale); only the gradient part of IMTL
    (no loss scaling).

    Deviations from the reference implementation: it inverts ``D Uᵀ`` in D-space (adding
    ``1e-8·I`` when that fails); we solve the equivalent Gramian system in float64 with
    ``numpy.linalg.lstsq``, in the variables ``β_i = α_i |g_i|`` and the common
    projection ``t``: ``C β = t·1`` with ``C`` the matrix of gradient cosines, and
    ``Σ β_i/|g_i| = 1`` (a (K+1)×(K+1) system; ``t`` may be 0, as when 0 lies between
    two nearly opposite gradients, where the closed form gives the zero direction too).
    Minimum-norm solution when singular; singular values under ``10·(K+1)·eps`` of the
    Gramian's dtype count as zero, so a float32 Gramian's rounding is not solved for, and
    gradient norms 1e6 apart are not.
    Degenerate inputs: zero gradient rows get weight 0 (they impose no condition); when
    the system is singular and only the zero direction has equal projections (K > rank,
    e.g. K > D), the least-squares weights of ``C β = 1`` are kept and
    ``info["fallback"]`` says so; if ``Σ A⁺n``
    vanishes (relative 1e-12; no direction with equal projections of sum-1 weights) or
    all rows are zero, the mean weights are returned with ``info["fallback"]`` set.
    """

    name = "imtl-g"
    reads_losses = False  # the weights come from the Gramian alone

    def weights(self, gram: Tensor | None, losses: Tensor | None) -> Tensor:
        a = gram.numpy()
        k = a.shape[0]
        mean = np.full(k, 1.0 / k)
        diag = np.clip(np.diag(a), 0.0, None)
        dmax = float(diag.max())
        if not dmax > 0.0:
            self.info["fallback"] = "all gradients are zero; used mean weights"
            return torch.from_numpy(mean)
        keep = diag > 1e-20 * dmax
        norms = np.sqrt(diag[keep])
        # In the variables β = α·|g| the system is C β = 1 with C the cosine matrix (unit
        # diagonal): its rounding is ~eps whatever the norms, so a short gradient is not
        # mistaken for rank deficiency (dividing A by its largest entry did that from a
        # norm ratio of ~1e3 on, with float32 Gramians). Singular values under the
        # Gramian's rounding level are rounding, not rank: a rank-deficient float32
        # Gramian is numerically full rank at float64's cutoff, and its exact solve would
        # fit the rounding noise.
        cos = a[np.ix_(keep, keep)] / np.outer(norms, norms)
        m = cos.shape[0]
        # Unknowns (β, t): C β = t·1 (equal projections t, which may be 0: 0 in the hull
        # of nearly opposite gradients) and Σ β_i/n_i = 1, the last row scaled by n_min so
        # its entries lie in (0, 1] like C's. Fixing t = 1 instead (C β = 1, then
        # normalising) has no solution when t = 0, and the least-squares fit returned a
        # direction against one of the tasks.
        n_min = float(norms.min())
        system = np.zeros((m + 1, m + 1))
        system[:m, :m] = cos
        system[:m, m] = -1.0
        system[m, :m] = n_min / norms
        rhs = np.zeros(m + 1)
        rhs[m] = n_min
        eps = self.gram_eps()
        rcond = 10 * (m + 1) * eps
        sol, _, rank, _ = np.linalg.lstsq(system, rhs, rcond=rcond)
        beta, t = sol[:m], float(sol[m])
        singular = rank < m + 1
        if singular and abs(t) <= 1e-8 * float(np.abs(beta).max()):
            # Singular (K > rank): only the zero direction has equal projections. The
            # documented choice is the least-squares fit of projections equal to 1.
            beta, _, _, _ = np.linalg.lstsq(cos, np.ones(m), rcond=10 * m * eps)
            t = 1.0
        v = beta / norms
        total = float(v.sum())
        if not np.isfinite(total) or abs(total) <= 1e-12 * float(np.abs(v).sum()):
            self.info["fallback"] = "no sum-1 weights give equal projections; used mean weights"
            return torch.from_numpy(mean)
        w = np.zeros(k)
        w[keep] = v / total
        if not keep.all():
            self.info["fallback"] = f"{int((~keep).sum())} zero gradient row(s) get weight 0"
        # With K > rank(G) the equal-projection system may have no exact solution with a
        # non-zero direction: then the least-squares weights are returned, and said so. A
        # nonsingular system always has one; its residual is rounding, ~eps·cond, which
        # exceeds 1e-8 from a condition number of ~1e8 on.
        scale = float(np.abs(beta).max()) + abs(t)
        miss = float(np.abs(cos @ beta - t).max()) / max(scale, 1e-300)
        if singular and miss > max(1e-8, 1e3 * eps):
            note = (
                f"no direction has equal projections on all unit gradients (relative "
                f"residual {miss:.2g}; K exceeds the rank of the gradients); used the "
                "least-squares weights"
            )
            earlier = self.info.get("fallback")
            self.info["fallback"] = f"{earlier}; {note}" if earlier else note
        return torch.from_numpy(w)
