"""CDG's metrics, in one table, and the solvers that apply them to fibres.

Each metric ``G`` couples neighbouring output channels through the discrete
Laplacian ``L`` along the channel index. ``L`` is diagonal in a fixed basis:
the Fourier basis for a periodic channel index (eigenvalues ``-mu_j``, ``mu_j =
4 sin^2(pi j / n)``) and the DCT-II basis for reflecting (Neumann) ends
(``mu_j = 4 sin^2(pi j / (2 n))``). So ``G^{-1}`` multiplies basis mode ``j``
by a number ``m_j``, and a metric is defined once, by ``m_j`` as a function of
``mu_j``, ``mu_1`` (the smallest non-zero eigenvalue) and the smoothing
``lam`` (:data:`METRICS`). Every metric keeps the channel mean: ``m_0 = 1``.

The solvers, all reading that table, apply ``G^{-1}`` to the rows of a 2-D
``(fibres, channels)`` array; each is exact up to rounding:

* ``"fft"``: the multipliers on a real FFT of each row (periodic), or on the
  DCT-II computed by Makhoul's method, one real FFT of length ``n`` of the
  reordered row (J. Makhoul, A fast cosine transform in one and two
  dimensions, IEEE Trans. ASSP 28(1), 1980). ``O(n log n)`` per fibre.
* ``"dense"``: the ``n x n`` operator ``B^T diag(m) B`` (``B`` the orthonormal
  basis above), applied as one matrix product; ``O(n)`` per channel, on the
  matrix units of an accelerator.
* ``"tridiagonal"``: only for ``sobolev``, where ``G = I - lam L`` is
  tridiagonal (cyclic when periodic). Entry ``(i, k)`` of its inverse is
  ``r^d`` summed over the periodic images ``d`` of ``|i - k|``, divided by
  ``sqrt(1 + 4 lam)``, for a ratio ``0 <= r < 1`` set by ``lam``. So the row
  is split into blocks of ``b`` channels, each block is multiplied by the
  ``b x b`` matrix ``r^|i - k|``, and what crosses block borders travels as
  geometric sums carried by a small matrix over the blocks' end values:
  ``O(b)`` operations per channel and a few passes over memory. Reflecting
  ends are the periodic solve of the even extension ``[x, flip(x)]``
  (``2 n`` channels), which needs no copy: a flipped block's end values are
  the original block's, read from the other end.

Numbers that depend only on ``n`` (eigenvalues, bases, block index tables)
are float64 numpy, cached; what depends on ``lam`` is jnp, so ``lam`` may be
traced (e.g. under :func:`optax.inject_hyperparams`).
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BOUNDARIES = ("periodic", "neumann")

# Above this, every metric's non-mean multipliers are below 1e-30 * n^2 / 10:
# the transform is the channel-mean projection to any float precision. The
# cap keeps 1 + 4 lam finite in the tridiagonal solver's float32 arithmetic.
MAX_SMOOTHING = 1e30

_HIGHEST = jax.lax.Precision.HIGHEST


class Metric(NamedTuple):
  """One metric ``G``, as every solver reads it.

  Attributes:
    gain: ``(mu, mu_1, lam) -> m``, the multiplier of the modes with
      eigenvalues ``mu > 0`` (arithmetic only, so numpy and jax values both
      work).
    default_smoothing: the ``smoothing`` used when none is given.
    least_smoothing: the smallest ``lam`` at which no mode is amplified
      (0 for ``sobolev``, where it means no smoothing).
    mean_and_rest: whether ``G^{-1}`` only keeps the mean and scales the rest,
      a closed form that needs no solver (and no whole fibres).
    tridiagonal: whether ``G = I - lam L``, so ``"tridiagonal"`` applies.
  """

  gain: Callable[..., jax.Array]
  default_smoothing: float
  least_smoothing: float
  mean_and_rest: bool = False
  tridiagonal: bool = False


# Defaults: sobolev 1.0 is a moderate low-pass that damps the highest channel
# frequency by 1 / (1 + 4) = 1/5. The re-weighted metrics scale the non-mean
# modes by at most 1 / lam, and lam = 1 makes `reweighted_l2` the identity, so
# 2.0 is the smallest round value that acts (halving them) without amplifying.
# `reweighted_sobolev` divides by mu_1 so that the lowest mode gains exactly
# 1 / lam at every width: raw, 1 / (lam mu_j) would give it n^2 / (4 pi^2 lam).
METRICS = {
    "sobolev": Metric(
        gain=lambda mu, mu_1, lam: 1.0 / (1.0 + lam * mu),
        default_smoothing=1.0, least_smoothing=0.0, tridiagonal=True),
    "reweighted_l2": Metric(
        gain=lambda mu, mu_1, lam: np.ones_like(mu) / lam,
        default_smoothing=2.0, least_smoothing=1.0, mean_and_rest=True),
    "reweighted_sobolev": Metric(
        gain=lambda mu, mu_1, lam: mu_1 / (lam * mu),
        default_smoothing=2.0, least_smoothing=1.0),
}


def metric_of(name: str) -> Metric:
  """The table entry of ``name``.

  Raises:
    ValueError: for a name that is not in :data:`METRICS`.
  """
  if name not in METRICS:
    raise ValueError(
        f"Unknown metric {name!r}: expected one of {tuple(METRICS)}.")
  return METRICS[name]


def usable_smoothing(
    lam: jax.Array, metric: str, allow_amplification: bool
) -> jax.Array:
  """A traced ``lam`` mapped into the range the constructor accepts.

  NaN and ``lam <= 0`` become the metric's ``least_smoothing`` (no smoothing
  for ``sobolev``, no amplification for the re-weighted metrics), and so does
  ``lam < 1`` for a re-weighted metric unless ``allow_amplification``; values
  above :data:`MAX_SMOOTHING` (``inf`` included) become it.

  Args:
    lam: the smoothing, a scalar array.
    metric: a name in :data:`METRICS`.
    allow_amplification: whether re-weighted ``0 < lam < 1`` is kept.

  Returns:
    ``lam`` or its replacement, same dtype.
  """
  least = metric_of(metric).least_smoothing
  bad = jnp.isnan(lam) | (lam <= 0)
  if not allow_amplification:
    bad = bad | (lam < least)
  return jnp.where(bad, least, jnp.minimum(lam, MAX_SMOOTHING)).astype(
      lam.dtype)


def multipliers(mu: np.ndarray, lam: jax.Array, metric: str) -> jax.Array:
  """``m`` for the modes with eigenvalues ``mu`` (static); ``m = 1`` at 0."""
  mean = (mu == 0).astype(np.float64)
  positive = mu[mu > 0]
  mu_1 = positive.min() if positive.size else 1.0
  # The mean's entry is replaced, not computed: 1 / (lam * 0) would make a
  # NaN that reaches derivatives in lam even when masked.
  gain = metric_of(metric).gain(np.where(mu > 0, mu, 1.0), mu_1, lam)
  return gain * (1.0 - mean) + mean


def _eigenvalues(n: int, boundary: str) -> np.ndarray:
  """``mu_j``, ``j = 0 .. n - 1``, float64."""
  period = n if boundary == "periodic" else 2 * n
  return 4.0 * np.sin(np.pi * np.arange(n) / period) ** 2


# ----------------------------------------------------------------------------
# FFT.


def fft_coefficients(
    n: int, lam: jax.Array, metric: str, boundary: str
) -> jax.Array:
  """What :func:`fft_rows` multiplies the ``rfft`` bins of a row by.

  Args:
    n: the number of channels (at least 2).
    lam: the smoothing, a scalar array (possibly traced).
    metric: a name in :data:`METRICS`.
    boundary: one of :data:`BOUNDARIES`.

  Returns:
    A complex ``(2, n // 2 + 1)`` array ``[a, b]``. Periodic: ``a`` is the
    multiplier ``m_0 .. m_{n // 2}`` and ``b`` is zero. Neumann: the ``rfft``
    ``V`` of the permuted row becomes ``a V + b conj(V)``.
  """
  # float64 numpy eigenvalues: exact constants keep float32 multipliers
  # accurate on wide layers.
  m = multipliers(_eigenvalues(n, boundary), lam, metric).astype(lam.dtype)
  half = n // 2
  complex_dtype = jnp.promote_types(lam.dtype, jnp.complex64)
  if boundary == "periodic":
    zeros = jnp.zeros(half + 1, lam.dtype)
    return jnp.stack([m[: half + 1], zeros]).astype(complex_dtype)
  # Makhoul's DCT-II through an FFT of the row reordered as
  # [x_0, x_2, ..., x_3, x_1]: cosine coefficient k is Re(w_k V_k) and
  # coefficient n - k is -Im(w_k V_k), with w_k = exp(-i pi k / (2 n)).
  # Scaling them by m_k and m_{n-k} and inverting gives a V + b conj(V).
  upper = jnp.concatenate([jnp.zeros((1,), lam.dtype), m[::-1][:half]])
  lower = m[: half + 1]
  twiddle = jnp.asarray(
      np.exp(1j * np.pi * np.arange(half + 1) / n), complex_dtype)
  return jnp.stack([((lower + upper) / 2).astype(complex_dtype),
                    (lower - upper) / 2 * twiddle])


def fft_rows(
    rows: jax.Array, coefficients: jax.Array, boundary: str
) -> jax.Array:
  """Applies ``G^{-1}`` to each row of a 2-D ``(fibres, channels)`` array."""
  n = rows.shape[-1]
  if boundary == "periodic":
    spectrum = jnp.fft.rfft(rows, axis=-1) * coefficients[0].real
    return jnp.fft.irfft(spectrum, n=n, axis=-1)
  # Neumann: Makhoul's DCT-II with real FFTs of length n; jax's `dct` pair
  # uses complex FFTs, and the even extension [x, flip(x)] length 2 n, each
  # holding about twice the data.
  half = (n + 1) // 2
  spectrum = jnp.fft.rfft(
      jnp.concatenate([rows[:, ::2], rows[:, 1::2][:, ::-1]], axis=-1),
      axis=-1)
  spectrum = (
      coefficients[0].real * spectrum + coefficients[1] * jnp.conj(spectrum))
  u = jnp.fft.irfft(spectrum, n=n, axis=-1)
  odd = jnp.pad(u[:, half:][:, ::-1], ((0, 0), (0, 2 * half - n)))
  return jnp.stack([u[:, :half], odd], axis=-1).reshape(-1, 2 * half)[:, :n]


# ----------------------------------------------------------------------------
# Dense.


@functools.lru_cache(maxsize=64)
def _basis(n: int, boundary: str) -> tuple[np.ndarray, np.ndarray]:
  """Orthonormal rows diagonalising ``L``, and each row's ``mu``, float64."""
  i = np.arange(n) + (0.0 if boundary == "periodic" else 0.5)
  if boundary == "neumann":  # DCT-II.
    j = np.arange(n)
    basis = np.cos(np.pi * np.outer(j, i) / n) * np.sqrt(2.0 / n)
    basis[0] /= np.sqrt(2.0)
    return basis, _eigenvalues(n, boundary)
  # Real Fourier basis: the constant, a cosine and a sine per frequency
  # 0 < j < n / 2, and the alternating row when n is even.
  j = np.arange(1, (n + 1) // 2)
  angles = 2 * np.pi * np.outer(j, i) / n
  rows = [np.ones((1, n)) / np.sqrt(n), np.cos(angles) * np.sqrt(2.0 / n),
          np.sin(angles) * np.sqrt(2.0 / n)]
  freq = [np.zeros(1, int), j, j]
  if n % 2 == 0:
    rows.append((-1.0) ** np.arange(n)[None] / np.sqrt(n))
    freq.append(np.array([n // 2]))
  mu = _eigenvalues(n, boundary)
  return np.concatenate(rows), mu[np.concatenate(freq)]


def dense_operator(
    n: int, lam: jax.Array, metric: str, boundary: str
) -> jax.Array:
  """The symmetric ``n x n`` matrix ``G^{-1} = B^T diag(m) B``, in lam's dtype.

  Args:
    n: the number of channels (at least 2).
    lam: the smoothing, a scalar array (possibly traced: then the operator is
      built in the graph, ``O(n^3)``).
    metric: a name in :data:`METRICS`.
    boundary: one of :data:`BOUNDARIES`.

  Returns:
    The operator; ``rows @ operator`` applies ``G^{-1}`` to each row.

  Examples:
    ``sobolev`` with ``lam = 1`` on a ring of 4 channels is the inverse of
    ``I - L``, 3 on the diagonal and -1 for each neighbour:

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from sgs_optax import _cdg_solvers as solvers
    >>> lam = jnp.float32(1.0)
    >>> op = solvers.dense_operator(4, lam, 'sobolev', 'periodic')
    >>> print(np.round(np.asarray(op), 3))
    [[0.467 0.2   0.133 0.2  ]
     [0.2   0.467 0.2   0.133]
     [0.133 0.2   0.467 0.2  ]
     [0.2   0.133 0.2   0.467]]
    >>> blocks = solvers.tridiagonal_operands(4, lam, 'sobolev', 'periodic')
    >>> rows = solvers.tridiagonal_rows(jnp.eye(4), blocks, 'periodic')
    >>> print(np.round(np.asarray(rows[0]), 3))
    [0.467 0.2   0.133 0.2  ]
  """
  basis, mu = _basis(n, boundary)
  m = multipliers(mu, lam, metric).astype(lam.dtype)
  basis = jnp.asarray(basis, lam.dtype)
  return jnp.matmul(basis.T, m[:, None] * basis, precision=_HIGHEST)


def dense_rows(rows: jax.Array, operator: jax.Array) -> jax.Array:
  """Applies :func:`dense_operator`'s matrix to each row, at full precision."""
  return jnp.matmul(rows, operator.astype(rows.dtype), precision=_HIGHEST)


# ----------------------------------------------------------------------------
# Tridiagonal (sobolev only).

# Below this the tridiagonal solve is the identity to any float precision;
# the floor keeps log(r) finite, and so derivatives in lam.
_LEAST_RATIO_SMOOTHING = 1e-30


class _Blocks(NamedTuple):
  """How :func:`tridiagonal_rows` splits a row of ``n`` channels (static).

  Attributes:
    size: channels per block, ``b``.
    count: blocks per row, ``n / b``.
    period: blocks per period: ``count``, or ``2 count`` for the even
      extension of reflecting ends.
    distance: ``(2 count, 2 count)`` ints: for each block sum (rows,
      interleaved ``end_0, start_0, end_1, ...``) and carry (columns,
      ``left_0 .. left_{count-1}, right_0 ..``), the number of blocks the
      carry travels, modulo ``period``.
    mask: ``(2 count, 2 count)`` 0/1: which block sums reach which carry.
  """

  size: int
  count: int
  period: int
  distance: np.ndarray
  mask: np.ndarray


def _block_cost(n: int, b: int) -> float:
  """Multiply-adds per channel of :func:`tridiagonal_rows` with blocks of b."""
  # b in the in-block product, 4 n / b^2 in the carry product over the 2 n / b
  # block ends, 2 to spread the carries.
  return b + 4 * n / b**2 + 2


def _block_size(n: int) -> int:
  """The divisor ``b`` of ``n`` with the fewest operations per channel."""
  divisors = [b for b in range(1, n + 1) if n % b == 0]
  return min(divisors, key=lambda b: _block_cost(n, b))


def tridiagonal_cost(n: int) -> float:
  """Multiply-adds per channel of :func:`tridiagonal_rows` for n channels.

  26 for 512 channels (blocks of 16); a width with no divisor near
  ``sqrt(n)`` (a large prime) has to use one block, ``n``.
  """
  return _block_cost(n, _block_size(n))


@functools.lru_cache(maxsize=64)
def _blocks(n: int, boundary: str) -> _Blocks:
  """The block plan of a row of ``n`` channels; see :class:`_Blocks`."""
  size = _block_size(n)
  count = n // size
  period = count if boundary == "periodic" else 2 * count
  source, target = np.arange(count)[:, None], np.arange(count)[None, :]
  distance = np.zeros((2 * count, 2 * count), np.int64)
  mask = np.zeros((2 * count, 2 * count))
  # Block k's left carry is the causal sum at the end of block k - 1; its
  # right carry is the anti-causal sum at the start of block k + 1.
  distance[0::2, :count] = (target - 1 - source) % period
  distance[1::2, count:] = (source - target - 1) % period
  mask[0::2, :count] = mask[1::2, count:] = 1
  if boundary == "neumann":
    # Block k of the flipped copy is block count - 1 - k reversed: its end
    # sum is that block's start sum, and its start sum that block's end sum.
    distance[1::2, :count] = (target + source) % period
    distance[0::2, count:] = (-source - target - 2) % period
    mask[1::2, :count] = mask[0::2, count:] = 1
  return _Blocks(size, count, period, distance, mask)


def _powers(log_r: jax.Array, k: np.ndarray) -> jax.Array:
  """``r^k`` for static integers ``k >= 0``."""
  return jnp.exp(k * log_r)


def tridiagonal_operands(
    n: int, lam: jax.Array, metric: str, boundary: str
) -> tuple[jax.Array, ...]:
  """The small matrices of :func:`tridiagonal_rows`, from a scalar ``lam``.

  ``I - lam L = c (I - r S)(I - r S^T)`` for the cyclic shift ``S``, with
  ``c r = lam`` and ``c (1 + r^2) = 1 + 2 lam``; the inverse's entries are
  ``r^d`` summed over the periodic images of the distance ``d``, divided by
  ``c (1 - r^2) = sqrt(1 + 4 lam)``.

  Args:
    n: the number of channels (at least 2).
    lam: the smoothing, a scalar array (possibly traced).
    metric: must be a tridiagonal metric (``"sobolev"``).
    boundary: one of :data:`BOUNDARIES`.

  Returns:
    ``(inner, carry, spread)``: the ``(b, b)`` in-block matrix, the ``(2 n /
    b, 2 n / b)`` carry matrix and the ``(2, b)`` weights that spread the
    carries into a block.
  """
  if not metric_of(metric).tridiagonal:
    raise ValueError(f"metric={metric!r} is not tridiagonal.")
  blocks = _blocks(n, boundary)
  b = blocks.size
  lam = jnp.maximum(lam, _LEAST_RATIO_SMOOTHING)
  root = jnp.sqrt(1 + 4 * lam)
  c = (1 + 2 * lam + root) / 2
  r = lam / c
  # Near r = 1 (large lam), log1p of 1 - r = (1 + root) / (2 c), which has
  # no cancellation; near r = 0, log(r) directly.
  log_r = jnp.where(r > 0.5, jnp.log1p(-(1 + root) / (2 * c)), jnp.log(r))
  i = np.arange(b)
  inner = _powers(log_r, np.abs(i[:, None] - i[None, :])) / root
  # A carry travelling d blocks around the period: q^d / (1 - q^period),
  # q = r^b. It applies to block sums that `inner` already divided by root.
  travel = _powers(log_r, b * np.arange(blocks.period)) / -jnp.expm1(
      b * blocks.period * log_r)
  carry = travel[blocks.distance] * blocks.mask
  spread = jnp.stack([_powers(log_r, i + 1), _powers(log_r, b - i)])
  return inner, carry, spread


def tridiagonal_rows(
    rows: jax.Array, operands: tuple[jax.Array, ...], boundary: str
) -> jax.Array:
  """Applies the ``sobolev`` ``G^{-1}`` to each row, block by block.

  Args:
    rows: a 2-D ``(fibres, channels)`` array.
    operands: from :func:`tridiagonal_operands`.
    boundary: one of :data:`BOUNDARIES` (already in ``operands``).

  Returns:
    ``G^{-1}`` applied to each row, same shape and dtype.
  """
  del boundary
  count, n = rows.shape
  inner, carry, spread = (a.astype(rows.dtype) for a in operands)
  b = inner.shape[0]
  dot = functools.partial(jnp.matmul, precision=_HIGHEST)
  within = dot(rows.reshape(count, n // b, b), inner)
  # inner[i, k] = r^|i - k| / root: the last column of each block holds its
  # causal sum at its end, the first its anti-causal sum at its start.
  ends = jnp.stack([within[..., -1], within[..., 0]], axis=-1)
  left, right = jnp.split(dot(ends.reshape(count, -1), carry), 2, axis=-1)
  out = within + left[..., None] * spread[0] + right[..., None] * spread[1]
  return out.reshape(count, n)


# ----------------------------------------------------------------------------
# The solver table.


class Solver(NamedTuple):
  """One way to apply ``G^{-1}`` to whole fibres.

  Attributes:
    operands: ``(n, lam, metric, boundary) -> arrays``, built once per
      channel count and smoothing, replicated on every device.
    rows: ``(rows, operands, boundary) -> rows`` on a 2-D ``(fibres,
      channels)`` array.
  """

  operands: Callable[[int, jax.Array, str, str], tuple[jax.Array, ...]]
  rows: Callable[[jax.Array, tuple[jax.Array, ...], str], jax.Array]


SOLVERS = {
    "fft": Solver(
        lambda *args: (fft_coefficients(*args),),
        lambda rows, operands, boundary: fft_rows(rows, *operands, boundary)),
    "dense": Solver(
        lambda *args: (dense_operator(*args),),
        lambda rows, operands, boundary: dense_rows(rows, *operands)),
    "tridiagonal": Solver(tridiagonal_operands, tridiagonal_rows),
}
