"""Decompositions: pure maths, tensors in and tensors out.

Every decomposition returns ``Factors`` with ``W ~ U diag(S) V`` exactly at full rank, where
``V`` already holds the inverse of the input transform (``D^-1`` for ASVD, ``L^-1`` for
Cholesky whitening, ``Lambda^-1/2 Q^T`` for eigen-whitening). Keeping any subset ``idx`` of
singular values gives ``A = U[:, idx] S[idx]^(1/2)`` (m x k) and ``B = S[idx]^(1/2) V[idx]``
(k x n).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import DecompositionError


@dataclass
class Factors:
    U: torch.Tensor   # (m, r)
    S: torch.Tensor   # (r,) descending; the layer's spectrum in the chosen space
    V: torch.Tensor   # (r, n)
    damping: float = 0.0   # whitening: relative damping that made the Gram matrix PD

    @property
    def rank(self) -> int:
        return self.S.numel()

    def factors(self, idx: torch.Tensor | list[int] | None = None, dtype=None):
        """``(A (m x k), B (k x n))`` for the kept indices (all when ``idx`` is None)."""
        if idx is None:
            idx = torch.arange(self.rank)
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.S.device)
        root = self.S[idx].clamp_min(0).sqrt()                    # (k,)
        A = self.U[:, idx] * root                                 # (m, k)
        B = root[:, None] * self.V[idx]                           # (k, n)
        return (A, B) if dtype is None else (A.to(dtype), B.to(dtype))

    def reconstruct(self, idx=None) -> torch.Tensor:
        A, B = self.factors(idx)
        return A @ B                                              # (m, n)

    def to(self, device=None, dtype=None) -> "Factors":
        return Factors(self.U.to(device, dtype), self.S.to(device, dtype),
                       self.V.to(device, dtype), self.damping)


def _svd(M: torch.Tensor):
    return torch.linalg.svd(M, full_matrices=False)


def svd(W: torch.Tensor) -> Factors:
    """Plain SVD of the weight: optimal for weight error."""
    U, S, Vh = _svd(W.float())
    return Factors(U, S, Vh)


def asvd(W: torch.Tensor, abs_mean: torch.Tensor, alpha: float = 0.5) -> Factors:
    """ASVD: SVD of ``W D`` with ``D = diag(s^alpha + 1e-6)``, ``s`` the mean |x| per channel.

    Exact SVD (the official code uses randomised ``svd_lowrank``; exact is better and cheap).
    """
    d = abs_mean.float().clamp_min(0).pow(alpha) + 1e-6          # (n,)
    U, S, Vh = _svd(W.float() * d)                               # W D
    return Factors(U, S, Vh / d)                                 # V = Vh D^-1


def _checked_gram(G: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(G in float64, mean of its diagonal)``; ``DecompositionError`` for a Gram matrix no
    whitening can use (NaN/Inf entries, or zero)."""
    G = G.double()
    if not torch.isfinite(G).all():
        raise DecompositionError("the Gram matrix has NaN/Inf entries: the calibration "
                                 "activations overflowed; use float32 or fewer/shorter samples")
    scale = G.diagonal().mean().item()
    if scale <= 0:
        raise DecompositionError("the Gram matrix is zero: this layer saw no calibration "
                                 "tokens; check the calibration source")
    return G, scale


def cholesky_damped(G: torch.Tensor, eps: float = 1e-6, tries: int = 6
                    ) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of ``G``, damping the diagonal when it is not positive definite.

    First ``G`` as is; then ``G + (-lambda_min + eps * mean diag) I``, with ``eps`` grown tenfold
    on each retry. Returns ``(L, damping relative to mean diag)``.
    """
    G, scale = _checked_gram(G)
    L, info = torch.linalg.cholesky_ex(G)
    if info.item() == 0:
        return L, 0.0
    lam_min = torch.linalg.eigvalsh(G)[0].item()
    shift = max(-lam_min, 0.0)
    for _ in range(tries):
        damp = shift + eps * scale
        eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        L, info = torch.linalg.cholesky_ex(G + damp * eye)
        if info.item() == 0:
            return L, damp / scale
        eps *= 10
    raise DecompositionError(
        f"the Gram matrix is not positive definite even after damping by {damp / scale:.1e} x "
        "its mean diagonal; give more calibration tokens (--n-calib/--seq-len) or use "
        "--decomposition asvd")


def whiten(W: torch.Tensor, gram: torch.Tensor, eps: float = 1e-6) -> Factors:
    """SVD-LLM whitening: ``G = L L^T``; SVD of ``W L``; ``V = Vh L^-1`` by a triangular solve.

    Then ``||W X - W' X||_F^2`` equals the sum of the dropped ``S_i^2``.
    """
    L, damp = cholesky_damped(gram, eps)                         # (n, n) lower, float64
    U, S, Vh = _svd(W.double().to(L.device) @ L)                 # float64 W freed before SVD
    # V L = Vh  <=>  L^T V^T = Vh^T (upper-triangular solve; never invert L).
    V = torch.linalg.solve_triangular(L.T, Vh.T, upper=True).T
    return Factors(U.float(), S.float(), V.float(), damp)


def eigen_whiten(W: torch.Tensor, gram: torch.Tensor, eps: float = 1e-6) -> Factors:
    """SVD-LLM V2's loss-optimised truncation: whitening by an eigendecomposition, no Cholesky.

    ``G = Q diag(lam) Q^T`` (``eigh`` in float64). Eigenvalues below ``eps * mean diag G`` (a
    singular or near-singular Gram: fewer calibration tokens than inputs, or rounding that
    makes them zero or negative) are clamped up to that floor, so ``S = Q diag(lam)^(1/2)`` is
    always invertible and nothing can fail. SVD of ``W S``; ``V = Vh S^-1 = (Vh / lam^(1/2))
    Q^T``: no inverse formed, the map back is a scaling and an orthogonal product.

    With nothing clamped, ``S S^T = G = L L^T``, so ``S = L O`` with ``O`` orthogonal: the
    spectrum and every truncation equal Cholesky whitening's, and ``||W X - W' X||_F^2`` is the
    sum of the dropped ``S_i^2``. With some clamped, the kept factors act on the calibration
    span as the pseudo-inverse would (the minimum loss on the calibration tokens, up to the
    floor), and on directions the calibration never excited they keep ``U_k U_k^T W`` (the
    weight projected on the kept outputs) instead of dropping the weight there. The floor is
    the one Cholesky damping starts from; in a Gram summed from float32 products, eigenvalues
    that small are mostly round-off. ``damping``: ``eps`` when the Gram is numerically singular
    (``lambda_min <= n * machine eps * lambda_max``, the usual numerical-rank cut: a run reports
    the layer as it reports a damped Cholesky one), else 0 (an ill-conditioned but positive
    definite Gram, which Cholesky takes undamped, is clamped without a report).
    """
    G, scale = _checked_gram(gram)
    lam, Q = torch.linalg.eigh(G)                                # (n,) ascending, (n, n)
    root = lam.clamp_min(eps * scale).sqrt()                     # (n,) diag of Lambda^(1/2)
    U, S, Vh = _svd((W.double().to(Q.device) @ Q) * root)        # SVD of W S, S = Q Lambda^1/2
    V = (Vh / root) @ Q.T                                        # (r, n): Vh S^-1
    singular = lam[0].item() <= lam.numel() * torch.finfo(lam.dtype).eps * lam[-1].item()
    return Factors(U.float(), S.float(), V.float(), eps if singular else 0.0)


def refit_output(W: torch.Tensor, B: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor,
                 eps: float = 1e-6) -> torch.Tensor:
    """The output factor ``A (m x k)`` minimising ``||W X - A B X'||_F`` for fixed ``B (k x n)``:
    ``A = W C B^T (B G B^T)^-1`` with ``C = X X'^T`` and ``G = X' X'^T`` (both n x n, summed over
    the tokens; ``refit.py``). ``B G B^T`` is solved by a damped Cholesky factor, so a Gram of
    fewer tokens than inputs cannot fail. Float64 throughout."""
    W, B = W.double().to(gram.device), B.double().to(gram.device)
    L, _ = cholesky_damped(B @ gram.double() @ B.T, eps)         # (k, k)
    rhs = W @ cross.double() @ B.T                               # (m, k)
    return torch.cholesky_solve(rhs.T, L).T                      # rhs (B G B^T)^-1


DECOMPOSITIONS: dict[str, Callable] = {}


def register_decomposition(name: str, needs: tuple[str, ...]):
    """Register ``fn(W, stats, **options) -> Factors``; ``needs`` names the statistics used."""
    def deco(fn):
        fn.needs = needs
        DECOMPOSITIONS[name] = fn
        return fn
    return deco


@register_decomposition("svd", needs=())
def _svd_entry(W, stats=None, **_):
    return svd(W)


@register_decomposition("asvd", needs=("absmean",))
def _asvd_entry(W, stats, alpha: float = 0.5, **_):
    return asvd(W, stats.abs_mean.to(W.device), alpha)


@register_decomposition("whiten", needs=("gram",))
def _whiten_entry(W, stats, eps: float = 1e-6, **_):
    return whiten(W, stats.gram, eps)


@register_decomposition("whiten-eig", needs=("gram",))
def _whiten_eig_entry(W, stats, eps: float = 1e-6, **_):
    return eigen_whiten(W, stats.gram, eps)


def work(m: int, n: int, method: str) -> int:
    """Rough floating-point work of decomposing an ``m x n`` layer, to share layers among
    processes by (``distributed.deal``): the SVD of an ``m x n`` matrix, ``~ m n min(m, n)``;
    whitening adds the ``n x n`` Cholesky or eigendecomposition and the product ``W L``,
    ``~ n^3 + m n^2`` (the down layer of a Llama block then outweighs the other six)."""
    svd_work = m * n * min(m, n)
    return svd_work + (n ** 3 + m * n * n if "gram" in DECOMPOSITIONS[method].needs else 0)


def decompose(W: torch.Tensor, method: str, stats=None, **options) -> Factors:
    if method not in DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {sorted(DECOMPOSITIONS)}, got {method!r}")
    return DECOMPOSITIONS[method](W, stats, **options)
