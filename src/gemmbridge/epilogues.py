"""The epilogue table: what each epilogue computes and which extra operands it reads and writes.

With ``P = alpha · op(a) @ op(b) + beta · c`` (row-major, ``M × N``, reduced over ``K``):

=============  =========================================  ==========================================
epilogue       result ``D``                               extra operands
=============  =========================================  ==========================================
none           ``P + bias``                               bias (N,) in, optional
relu           ``relu(P + bias)``                         bias in, optional
gelu           ``gelu(P + bias)``                         bias in, optional
relu_aux       ``relu(P + bias)``                         bias in, optional; aux out: the mask ``P + bias > 0``
gelu_aux       ``gelu(P + bias)``                         bias in, optional; aux out: ``P + bias``
drelu          ``P ⊙ mask``                               aux in: a relu_aux mask
dgelu          ``P ⊙ gelu′(aux)``                         aux in: a gelu_aux pre-activation
drelu_bgrad    ``P ⊙ mask``                               aux in; bias_grad out (N,): ``Σ_m D[m, n]``
dgelu_bgrad    ``P ⊙ gelu′(aux)``                         aux in; bias_grad out (N,): ``Σ_m D[m, n]``
bgrad_a        ``P``                                      bias_grad out (M,): ``Σ_k op(a)[m, k]``
bgrad_b        ``P``                                      bias_grad out (N,): ``Σ_k op(b)[k, n]``
=============  =========================================  ==========================================

GELU is the tanh approximation, the form cuBLASLt computes (``reference.gelu``). These are the
epilogues of a training step: a layer's forward saves its pre-activation (``*_aux``); the backward
GEMM that makes the input gradient applies the activation's derivative and reduces the previous
layer's bias gradient (``d*_bgrad``); the weight-gradient GEMM reduces the bias gradient of its
own layer (``bgrad_a`` with ``a = dyᵀ``).

Aux layout (matrices only, no batch dims): row ``m`` of the result is row ``m`` of aux, with a
padded row length (``aux_shape``). gelu: the result's dtype, ``N`` rounded up to a multiple of 8
elements. relu: ``uint8`` bytes of a bit mask, ``N`` rounded up to a multiple of 128 bits; bit
``n % 8`` of byte ``n // 8`` is set where ``P + bias > 0``. Padding is never read; in an aux that
gemmbridge allocates it is zero, so results are deterministic to the byte.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Epilogue:
    """One row of the table above."""

    name: str
    activation: str = "none"  # "none", "relu" or "gelu": applied to P + bias
    takes_bias: bool = False  # bias (N,) may be given
    aux_out: str = "none"  # "relu" or "gelu": the pre-activation is saved in aux
    aux_in: str = "none"  # "relu" or "gelu": D = P ⊙ activation′(aux)
    bias_grad: str = "none"  # what bias_grad reduces: "a" (Σ_k op(a), M), "b" (Σ_k op(b), N), "d" (Σ_m D, N)

    @property
    def aux(self) -> str:
        """The activation whose aux this epilogue reads or writes, or "none"."""
        return self.aux_out if self.aux_out != "none" else self.aux_in

    @property
    def training(self) -> bool:
        """True when the epilogue reads or writes aux or bias_grad (2-D problems only)."""
        return self.aux != "none" or self.bias_grad != "none"


TABLE: dict[str, Epilogue] = {
    e.name: e
    for e in (
        Epilogue("none", takes_bias=True),
        Epilogue("relu", activation="relu", takes_bias=True),
        Epilogue("gelu", activation="gelu", takes_bias=True),
        Epilogue("relu_aux", activation="relu", takes_bias=True, aux_out="relu"),
        Epilogue("gelu_aux", activation="gelu", takes_bias=True, aux_out="gelu"),
        Epilogue("drelu", aux_in="relu"),
        Epilogue("dgelu", aux_in="gelu"),
        Epilogue("drelu_bgrad", aux_in="relu", bias_grad="d"),
        Epilogue("dgelu_bgrad", aux_in="gelu", bias_grad="d"),
        Epilogue("bgrad_a", bias_grad="a"),
        Epilogue("bgrad_b", bias_grad="b"),
    )
}
NAMES = tuple(TABLE)

RELU_AUX_BITS = 128  # a relu mask row is padded to a multiple of 128 bits
GELU_AUX_ELEMENTS = 8  # a gelu pre-activation row is padded to a multiple of 8 elements


def _round_up(x: int, base: int) -> int:
    return -(-x // base) * base


def aux_shape(epilogue: str, m: int, n: int) -> tuple[int, int]:
    """Shape of the aux matrix of ``epilogue`` for an ``m × n`` result (rows padded)."""
    kind = TABLE[epilogue].aux
    if kind == "relu":
        return m, _round_up(n, RELU_AUX_BITS) // 8
    if kind == "gelu":
        return m, _round_up(n, GELU_AUX_ELEMENTS)
    raise ValueError(f"epilogue {epilogue!r} has no aux")


def aux_is_padded(epilogue: str, n: int) -> bool:
    """True when the aux rows of ``epilogue`` for ``n`` columns carry padding (or a partly used byte)."""
    return aux_shape(epilogue, 1, n)[1] * (8 if TABLE[epilogue].aux == "relu" else 1) != n


def aux_dtype(epilogue: str, result_dtype: str) -> str:
    """dtype of the aux matrix: uint8 (a bit mask) for relu, the result's dtype for gelu."""
    return "uint8" if TABLE[epilogue].aux == "relu" else result_dtype


def bias_grad_length(epilogue: str, m: int, n: int) -> int:
    """Length of the bias gradient of ``epilogue``: M for bgrad_a, else N."""
    return m if TABLE[epilogue].bias_grad == "a" else n
