"""The 3-party protocol of the vertically partitioned linear regression (DESIGN.md section 6).

Party 0 (x_owner) holds X (n x d), party 1 (y_owner) holds y (n), party 2 (the third seat: model owner or
helper) holds nothing; `task.output_party` (any of the three) alone learns the weights (intercept first) and
the metrics. Everything that touches only X is done by the x-owner in plaintext; only the products that mix
owners go through the engine (`services.mpc.private_product`). The steps, in the order they happen:

1. x_owner, plaintext (two passes over X, in row blocks): column means mu, column scaling D (1/norm of the
   centred column), the Gram matrix G of Xc = (X - mu) D (unit diagonal) and its Cholesky factor L (G = L L^T;
   singular or nearly so -> `numpy.linalg.LinAlgError`, which the facade turns into a message naming the
   constant or collinear columns). Qc = Xc L^-T has orthonormal columns, so every entry of
   M = U Qc^T (U a random rotation from the x-owner's own seed) lies in [-1, 1]: M's fixed-point scale 2^a is
   public and says nothing about X's units.
2. y_owner, plaintext: ybar, yc = y - ybar, SS_tot = ||yc||^2 (zero -> `ConstantTargetError`), and
   yc~ = round(yc 2^fy) with fy chosen so that 2^(b-1) <= ||yc|| 2^fy < 2^b. Then |(M~ yc~)_i| < 2^(a+b)(1+eps):
   no overflow whatever the data.
3. One private product v~ = M~ yc~ (x_owner's matrix, y_owner's vector, party 2 helping), re-randomized and
   opened to the output party, with fy and SS_tot from the y-owner. v = U Qc^T yc is a uniformly random
   direction (U) of length ||Qc^T yc||, and ||v||^2 = SS_tot - SS_res: mse = SS_res / n, r2 = 1 - SS_res/SS_tot.
   That difference cancels when r2 is near 1, so both roundings are made consistent instead of amplified:
   the y-owner computes SS_tot of its encoded yc~ exactly (integer sums), and the x-owner, while streaming M~,
   accumulates R^T Z (R = M~ - M 2^a, its rounding residuals) to form the d x d matrix E with
   ||P yc~||^2 = v^T (I + E) v for the rounded M~; c = v^T E v is opened to the output party through a third,
   d^2-word private product (x-owner's E, output party's v v^T).
4. Weights w = K v + ybar e_0 with K = [-mu^T W; W], W = D L^-T U^T (the x-owner's (d+1) x d matrix): slopes
   = W v and intercept = ybar - mu^T slopes. By output party:
   - x_owner: it computes K v itself; the y-owner sends it ybar (which it could compute from the outputs:
     ybar = intercept + mu^T slopes).
   - y_owner: private product K~ v~ (x_owner's K at scale 2^(FK - kx), y_owner's v normalized to the unit ball
     at scale 2^Fv, party 2 helping), opened to the y-owner; the x-owner sends kx, the exponent of K's largest
     row norm, needed to decode; the y-owner adds its own ybar.
   - third seat: the same product with the model owner's v (scale 2^(Fv - t)), plus ybar brought in by a
     second, 1 x 1 private product c * ybar~ (model owner's c = 2^(FK - kx - t + ky), y-owner's
     ybar~ = ybar 2^(fy - b + Fv - ky), the x-owner helping), so both terms share the scale
     2^(fy - b + Fv - t + FK - kx) and neither the x-owner nor the y-owner learns the other's exponent. The
     model owner receives kx from the x-owner and ky (the exponent of |ybar| / 2^(b - fy)) from the y-owner;
     t = max(0, ky - kx) keeps the sum below 2^62.

What each party learns. All three learn the public n, d, column names and these parameters, and whether the
others' data could be used (the statuses). Every ring array a party receives is masked by a PRF it does not
hold, and every opened value arrives re-randomized by a fresh sharing of zero, so it carries nothing beyond
its sum. Beyond that:
- x_owner: nothing about y (it receives only masked arrays: yc~ - r and (v v^T)~ - r in step 3, v~ - r in
  step 4). As output party: v, SS_tot, fy and ybar, all of which follow from the outputs, n and its own X.
- y_owner: nothing about X (it receives M~ - S in step 3, c - S in step 4). As output party: v (a uniformly
  random direction whose length follows from the outputs), c (= ||P yc~||^2 - ||v||^2, which follows from
  the outputs and v), kx (one power-of-two exponent of the size of X's whitening matrix D L^-T) and the outputs.
- third seat, as helper: nothing at all (it receives no ring array; it only expands PRFs). As model owner:
  the outputs, v, c, SS_tot and fy (which follow from the outputs and n) and two power-of-two exponents: kx and
  ky (the size of |ybar| / ||yc|| within a factor of 2).

Accuracy: with a = b = 31 the relative error of v is about 2^-31 sqrt(2)/sqrt(12) ~ 2e-10 of ||yc|| (rounding
errors add in quadrature; the hard worst case is 2^-31 sqrt(n)). The weights' error is that times the
conditioning of X (measured ~1e-9 of the largest weight). After the corrections of step 3 the metrics' relative
error is about 6e-10 / sqrt(1 - r2) (mse within 1e-6 up to r2 ~ 0.9999996; r2 itself within ~1e-12).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from services.mpc.additive import reveal_additive
from services.mpc.errors import ProtocolError
from services.mpc.fixed_point import decode, encode, encode_scaled
from services.mpc.party import Party
from services.mpc.prf import PartySeeds
from services.mpc.private_product import block_bounds, private_matvec, send_masked_vector
from services.mpc.ring import RING_DTYPE
from services.mpc.transport import Transport

from .errors import JobDataError, RowCountsDiffer
from .protocol_threads import single_threaded_blas
from .task import THIRD_SEAT, X_OWNER, Y_OWNER, LinearRegressionResult, LinearRegressionTask

__all__ = ["ConstantTargetError", "LinearRegressionResult", "PartySeeds", "ProtocolError", "run_party"]

# Public parameters of the protocol (every party uses the same).
BLOCK_ROWS = 1 << 15  # rows per streamed block of M^T: bounds memory, ~8 MiB per block at d = 32
M_FRAC_BITS = 31  # a: M's entries are in [-1, 1]
Y_NORM_BITS = 31  # b: ||yc~|| < 2^b, so |M~ yc~| < 2^(a+b) = 2^62
K_FRAC_BITS = 30  # FK: rows of K~ have norm < 2^FK
V_FRAC_BITS = 30  # Fv: the normalized v (and ybar) have norm < 2^Fv
MIN_EIGENVALUE_RATIO = 1e-14  # of the centred, scaled Gram matrix: below it the columns count as collinear
FAST_PATH_MAX_OFFSET = 1e3  # |column mean| / spread up to which X^T X is centred after the product
ROUNDING_OFFSET = 2.0**40  # public offset on M~'s entries so that a cast rounds (see _MBlocks)
CORRECTION_FRAC_BITS = 50  # the metric correction E (|E| <= 2^-20) is encoded with 50 fractional bits ...
CORRECTION_LIMIT_BITS = 20
OUTER_FRAC_BITS = 24  # ... and v v^T (normalized, entries <= 1) with 24: sum < d 2^30 2^24 <= 2^60 for d <= 64

_STATUS_OK, _STATUS_SINGULAR, _STATUS_CONSTANT_Y = 0, 1, 2
_NO_EXPONENT = -(1 << 20)  # ky when ybar == 0: its term vanishes
# The exponent of a positive finite float64 (kx, ky, and fy's range with room): a partner's value outside it is no
# value this protocol makes, and would overflow numpy's ldexp or give infinite weights.
_EXPONENT_RANGE = range(-1100, 1100)
_ROLE = {X_OWNER: "x_owner", Y_OWNER: "y_owner", THIRD_SEAT: "third seat"}


def _partner_sent(frm: int, what: str) -> ProtocolError:
    """A partner's genuine message holds a value this protocol never sends: a bug, another version, or a worker
    that means harm. The error names that seat, for its operator."""
    return ProtocolError(f"the {_ROLE[frm]} worker sent {what}; are all workers running the same version, "
                         "unmodified?")

Progress = Callable[[float, str], None]


class ConstantTargetError(JobDataError):
    """The y column does not vary, so there is nothing to fit."""

    def __init__(self, column: str) -> None:
        self.column = column
        super().__init__(f"the y column {column!r} is constant (its values do not vary beyond float rounding); "
                         "a regression needs a target that varies")


@dataclass
class _XPlan:
    """The x-owner's plaintext results of step 1."""

    n: int
    mu: np.ndarray  # column means (d)
    w_scaled: np.ndarray  # W 2^a (d x d): M~^T = (X - mu) W 2^a, rounded
    k: np.ndarray  # K = [-mu^T W; W], (d + 1) x d
    centre_first: bool  # subtract mu from each block before the product (columns with |mean| >> spread)
    block_offset: np.ndarray  # added to each row of a block's product: 2^40 + 1/2 (- mu W 2^a)
    rotation: np.ndarray  # U


@dataclass
class _YPlan:
    """The y-owner's plaintext results of step 2."""

    n: int
    ybar: float
    ss_tot: float
    fy: int
    y_encoded: np.ndarray  # yc~ (n ring elements)


class _Clock:
    """Seconds per phase, reported through `progress(fraction, phase)` at the end of each phase."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, fraction: float, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self._last
        self._last = now
        if self.progress is not None:
            self.progress(fraction, phase)


def run_party(index: int, task: LinearRegressionTask, data: np.ndarray | None, transport: Transport,
              seeds: PartySeeds, progress: Progress | None = None) -> LinearRegressionResult | None:
    """Run party `index`'s role; return the result at `task.output_party`, None elsewhere.

    `data` is X (n x d float64, validated finite) at party 0, y (n float64) at party 1, None at party 2.
    `progress(fraction, phase)` is called at the end of the phases prepare, product, reveal, weights; the
    output party's result carries the seconds per phase in `result.seconds`.
    """
    party = Party.create(index, transport, seeds)
    clock = _Clock(progress)
    with single_threaded_blas():
        if index == X_OWNER:
            return _x_owner(party, task, np.asarray(data, dtype=np.float64), clock)
        if index == Y_OWNER:
            return _y_owner(party, task, np.asarray(data, dtype=np.float64), clock)
        return _third_seat(party, task, clock)


# --- the three roles ------------------------------------------------------------------------------------------

def _x_owner(party: Party, task: LinearRegressionTask, x: np.ndarray, clock: _Clock) -> LinearRegressionResult | None:
    """Party 0: steps 1 and 3 as matrix owner, step 4's K (or the whole step 4 when it is the output party)."""
    if x.ndim != 2 or x.shape[1] != task.d:
        raise ProtocolError(f"the x-owner's data must be an n x {task.d} array")
    n = x.shape[0]
    out = task.output_party
    _announce_rows(party, n, (Y_OWNER, THIRD_SEAT))
    _check_rows(x_rows=n, y_rows=_receive_int(party, Y_OWNER, "lr/y-rows"))
    try:
        plan = _prepare_x(party, x)
    except np.linalg.LinAlgError:
        _send_status(party, "lr/x-status", _STATUS_SINGULAR, (Y_OWNER, THIRD_SEAT))
        raise
    _send_status(party, "lr/x-status", _STATUS_OK, (Y_OWNER, THIRD_SEAT))
    _check_status(party, Y_OWNER, "lr/y-status")
    clock.done(0.3, "prepare")

    m_blocks = _MBlocks(x, plan)
    share = private_matvec(party, "lr/v", matrix_owner=X_OWNER, vector_owner=Y_OWNER, n=n, m=task.d,
                           blocks=m_blocks, block_rows=BLOCK_ROWS)
    correction = m_blocks.metric_correction()
    clock.done(0.85, "product")
    v_ring = reveal_additive(party, "lr/v-open", share, out)

    if out == X_OWNER:
        assert v_ring is not None
        ss_tot, fy = _receive_meta(party)
        v = decode(v_ring, M_FRAC_BITS + fy)
        clock.done(0.9, "reveal")
        ybar = float(party.receive(Y_OWNER, "lr/ybar", (1,), np.float64)[0])
        if not np.isfinite(ybar):
            raise _partner_sent(Y_OWNER, "a y mean that is not a finite number")
        slopes = plan.k[1:] @ v
        weights = np.concatenate([[ybar - plan.mu @ slopes], slopes])
        clock.done(1.0, "weights")
        return _result(weights, ss_tot, v, float(v @ correction @ v), n, clock)
    clock.done(0.9, "reveal")
    _open_metric_correction(party, task, correction=correction)
    kx = _exponent(float(np.max(np.linalg.norm(plan.k, axis=1))))
    party.send(out, "lr/kx", np.array([kx], dtype=np.int64))
    k_encoded = encode(np.ldexp(plan.k, K_FRAC_BITS - kx), 0, what="the x-owner's weight matrix")
    share = private_matvec(party, "lr/w", matrix_owner=X_OWNER, vector_owner=out, n=task.d, m=task.d + 1,
                           blocks=[np.ascontiguousarray(k_encoded.T)], block_rows=task.d)
    if out == THIRD_SEAT:  # the 1 x 1 product c * ybar~: the x-owner helps
        share[:1] += private_matvec(party, "lr/w-ybar", matrix_owner=THIRD_SEAT, vector_owner=Y_OWNER, n=1, m=1)
    reveal_additive(party, "lr/w-open", share, out)
    clock.done(1.0, "weights")
    return None


def _y_owner(party: Party, task: LinearRegressionTask, y: np.ndarray, clock: _Clock) -> LinearRegressionResult | None:
    """Party 1: step 2, step 3 as vector owner, ybar into step 4 (or v into step 4 when it is the output party)."""
    if y.ndim != 1:
        raise ProtocolError("the y-owner's data must be a vector")
    n = y.shape[0]
    out = task.output_party
    _announce_rows(party, n, (X_OWNER, THIRD_SEAT))
    plan = _prepare_y(y, task.y_column)
    if plan is None:
        _send_status(party, "lr/y-status", _STATUS_CONSTANT_Y, (X_OWNER, THIRD_SEAT))
        raise ConstantTargetError(task.y_column)
    _send_status(party, "lr/y-status", _STATUS_OK, (X_OWNER, THIRD_SEAT))
    # yc~ - r (uniform to the x-owner) goes out before the x-owner's row count and status are known: it is there
    # by the time the x-owner has loaded and prepared X, which otherwise waits one more round trip for it.
    send_masked_vector(party, "lr/v", matrix_owner=X_OWNER, vector_owner=Y_OWNER, n=n, vector=plan.y_encoded)
    _check_rows(x_rows=_receive_int(party, X_OWNER, "lr/x-rows"), y_rows=n)
    _check_status(party, X_OWNER, "lr/x-status")
    clock.done(0.3, "prepare")

    share = private_matvec(party, "lr/v", matrix_owner=X_OWNER, vector_owner=Y_OWNER, n=n, m=task.d,
                           vector=plan.y_encoded, block_rows=BLOCK_ROWS, vector_sent=True)
    # The x-owner's blocks carry + 2^40 on every entry: remove 2^40 sum(yc~) (array arithmetic wraps silently).
    share -= np.array([plan.y_encoded.sum()], dtype=RING_DTYPE) * RING_DTYPE(int(ROUNDING_OFFSET))
    clock.done(0.85, "product")
    v_ring = reveal_additive(party, "lr/v-open", share, out)
    if out != Y_OWNER:
        party.send(out, "lr/y-meta", np.array([plan.ss_tot, plan.fy], dtype=np.float64))
    clock.done(0.9, "reveal")

    if out == X_OWNER:
        party.send(X_OWNER, "lr/ybar", np.array([plan.ybar]))
        clock.done(1.0, "weights")
        return None
    if out == Y_OWNER:
        assert v_ring is not None
        v = decode(v_ring, M_FRAC_BITS + plan.fy)
        v_encoded = encode(np.ldexp(v, plan.fy - Y_NORM_BITS), V_FRAC_BITS, what="the opened vector v")
        # Both masked vectors go out together: the x-owner answers both products in one round trip, not two.
        send_masked_vector(party, "lr/c", matrix_owner=X_OWNER, vector_owner=Y_OWNER, n=task.d * task.d,
                           vector=_outer_vector(v, plan.fy))
        send_masked_vector(party, "lr/w", matrix_owner=X_OWNER, vector_owner=Y_OWNER, n=task.d, vector=v_encoded)
        correction = _open_metric_correction(party, task, v=v, fy=plan.fy, vector_sent=True)
        kx = _receive_exponent(party, X_OWNER, "lr/kx")
        share = private_matvec(party, "lr/w", matrix_owner=X_OWNER, vector_owner=Y_OWNER, n=task.d, m=task.d + 1,
                               vector=v_encoded, block_rows=task.d, vector_sent=True)
        opened = reveal_additive(party, "lr/w-open", share, Y_OWNER)
        assert opened is not None
        weights = decode(opened, plan.fy - Y_NORM_BITS + V_FRAC_BITS + K_FRAC_BITS - kx)
        weights[0] += plan.ybar
        clock.done(1.0, "weights")
        return _result(weights, plan.ss_tot, v, correction, n, clock)
    # Output to the third seat: the y-owner helps with E v v^T and K~ v~ and brings ybar in through c * ybar~.
    _open_metric_correction(party, task)
    ky = _exponent(abs(plan.ybar) * 2.0 ** (plan.fy - Y_NORM_BITS)) if plan.ybar != 0 else _NO_EXPONENT
    party.send(THIRD_SEAT, "lr/ky", np.array([ky], dtype=np.int64))
    share = private_matvec(party, "lr/w", matrix_owner=X_OWNER, vector_owner=THIRD_SEAT, n=task.d, m=task.d + 1)
    ybar_encoded = (encode(np.ldexp(np.array([plan.ybar]), plan.fy - Y_NORM_BITS + V_FRAC_BITS - ky), 0,
                           what="the y mean") if ky != _NO_EXPONENT else np.zeros(1, dtype=RING_DTYPE))
    ybar_share = private_matvec(party, "lr/w-ybar", matrix_owner=THIRD_SEAT, vector_owner=Y_OWNER, n=1, m=1,
                                vector=ybar_encoded, block_rows=1)
    share[:1] += ybar_share
    reveal_additive(party, "lr/w-open", share, THIRD_SEAT)
    clock.done(1.0, "weights")
    return None


def _third_seat(party: Party, task: LinearRegressionTask, clock: _Clock) -> LinearRegressionResult | None:
    """Party 2: the helper of step 3; in step 4 the helper again, or the model owner with v and the outputs."""
    out = task.output_party
    x_rows = _receive_int(party, X_OWNER, "lr/x-rows")
    n = _receive_int(party, Y_OWNER, "lr/y-rows")
    _check_rows(x_rows=x_rows, y_rows=n)
    # The helper's share needs no data, so it is computed while the x-owner is still preparing.
    share = private_matvec(party, "lr/v", matrix_owner=X_OWNER, vector_owner=Y_OWNER, n=n, m=task.d,
                           block_rows=BLOCK_ROWS)
    _check_status(party, X_OWNER, "lr/x-status")
    _check_status(party, Y_OWNER, "lr/y-status")
    clock.done(0.3, "prepare")
    clock.done(0.85, "product")
    v_ring = reveal_additive(party, "lr/v-open", share, out)
    if out == X_OWNER:
        clock.done(0.9, "reveal")
        clock.done(1.0, "weights")
        return None
    if out == Y_OWNER:  # the third seat helps with E v v^T and K~ v~
        clock.done(0.9, "reveal")
        _open_metric_correction(party, task)
        share = private_matvec(party, "lr/w", matrix_owner=X_OWNER, vector_owner=Y_OWNER, n=task.d, m=task.d + 1)
        reveal_additive(party, "lr/w-open", share, Y_OWNER)
        clock.done(1.0, "weights")
        return None

    assert v_ring is not None
    ss_tot, fy = _receive_meta(party)
    v = decode(v_ring, M_FRAC_BITS + fy)
    clock.done(0.9, "reveal")
    correction = _open_metric_correction(party, task, v=v, fy=fy)
    kx = _receive_exponent(party, X_OWNER, "lr/kx")
    ky = _receive_exponent(party, Y_OWNER, "lr/ky", allow_none=True)
    t = max(0, ky - kx)
    v_encoded = encode(np.ldexp(v, fy - Y_NORM_BITS - t), V_FRAC_BITS, what="the opened vector v")
    share = private_matvec(party, "lr/w", matrix_owner=X_OWNER, vector_owner=THIRD_SEAT, n=task.d, m=task.d + 1,
                           vector=v_encoded, block_rows=task.d)
    c_exponent = K_FRAC_BITS - kx - t + ky
    c = np.array([[1 << c_exponent if c_exponent >= 0 else 0]], dtype=RING_DTYPE)  # below 2^0: ybar negligible
    ybar_share = private_matvec(party, "lr/w-ybar", matrix_owner=THIRD_SEAT, vector_owner=Y_OWNER, n=1, m=1,
                                blocks=[c], block_rows=1)
    share[:1] += ybar_share
    opened = reveal_additive(party, "lr/w-open", share, THIRD_SEAT)
    assert opened is not None
    weights = decode(opened, fy - Y_NORM_BITS + V_FRAC_BITS - t + K_FRAC_BITS - kx)
    clock.done(1.0, "weights")
    return _result(weights, ss_tot, v, correction, n, clock)


def _open_metric_correction(party: Party, task: LinearRegressionTask, *, correction: np.ndarray | None = None,
                            v: np.ndarray | None = None, fy: int = 0, vector_sent: bool = False) -> float | None:
    """Step 3b: c = v^T E v, opened to the output party (x-owner's E, output party's v v^T, the third party helping).

    Returns c at the output party; `vector_sent`: it already sent its masked v v^T (`send_masked_vector`).
    """
    out, words = task.output_party, task.d * task.d
    blocks = vector = None
    if party.index == X_OWNER:
        assert correction is not None
        blocks = [encode(correction, CORRECTION_FRAC_BITS, what="the metric correction").reshape(words, 1)]
    if party.index == out:
        assert v is not None
        vector = _outer_vector(v, fy)
    share = private_matvec(party, "lr/c", matrix_owner=X_OWNER, vector_owner=out, n=words, m=1, blocks=blocks,
                           vector=vector, block_rows=words, vector_sent=vector_sent)
    opened = reveal_additive(party, "lr/c-open", share, out)
    if opened is None:
        return None
    return float(decode(opened, CORRECTION_FRAC_BITS + OUTER_FRAC_BITS + 2 * (fy - Y_NORM_BITS))[0])


def _outer_vector(v: np.ndarray, fy: int) -> np.ndarray:
    """The output party's input to step 3b: v v^T encoded, v first normalized by 2^(fy - b) (so ||v|| <= 1)."""
    normalized = np.ldexp(v, fy - Y_NORM_BITS)
    return encode(np.outer(normalized, normalized).ravel(), OUTER_FRAC_BITS, what="v v^T")


# --- plaintext steps ----------------------------------------------------------------------------------------

def _prepare_x(party: Party, x: np.ndarray) -> _XPlan:
    """Step 1: means, scaling, Cholesky of the centred scaled Gram matrix, rotation; LinAlgError if singular."""
    n, d = x.shape
    mu, centred_gram, centre_first = _centred_gram(x)
    diagonal = np.diag(centred_gram).copy()
    if not np.all(diagonal > 0):
        raise np.linalg.LinAlgError("constant x column")
    scale = 1.0 / np.sqrt(diagonal)  # D
    g = centred_gram * np.outer(scale, scale)
    g = (g + g.T) / 2
    eigenvalues = np.linalg.eigvalsh(g)
    if eigenvalues[0] <= MIN_EIGENVALUE_RATIO * eigenvalues[-1]:
        raise np.linalg.LinAlgError("collinear x columns")
    lower = np.linalg.cholesky(g)
    l_inv = np.linalg.inv(lower)
    if np.max(np.abs(l_inv @ g @ l_inv.T - np.eye(d))) > 1e-2:  # Qc = Xc L^-T would not be orthonormal
        raise np.linalg.LinAlgError("collinear x columns")
    rotation = _random_rotation(party, d)
    w = scale[:, None] * (l_inv.T @ rotation.T)  # W = D L^-T U^T: M^T = (X - mu) W
    k = np.vstack([-(mu @ w)[None, :], w])
    w_scaled = np.asfortranarray(np.ldexp(w, M_FRAC_BITS))
    # Each entry of a block gets 2^40 + 1/2 added, so that the cast to integers (a truncation) rounds to nearest.
    offset = ROUNDING_OFFSET + 0.5 - (0.0 if centre_first else mu @ w_scaled)
    return _XPlan(n=n, mu=mu, w_scaled=w_scaled, k=k, centre_first=centre_first, block_offset=offset,
                  rotation=rotation)


def _centred_gram(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Column means and (X - mu)^T (X - mu); True when the data had to be centred block by block.

    The fast path is one BLAS product over X, centred afterwards, whose relative error grows like
    eps (|mean| / spread)^2; columns whose mean dwarfs their spread are centred first (shifted by their first
    row, which keeps the sums exact), one block at a time.
    """
    n, d = x.shape
    mu = x.sum(axis=0) / n
    centred = x.T @ x - n * np.outer(mu, mu)
    diagonal = np.diag(centred)
    if np.all(diagonal > 0) and np.all(n * mu**2 <= FAST_PATH_MAX_OFFSET**2 * diagonal):
        return mu, centred, False
    shift = x[0].copy()
    total = np.zeros(d)
    gram = np.zeros((d, d))
    for start, stop in block_bounds(n, BLOCK_ROWS):
        block = x[start:stop] - shift
        total += block.sum(axis=0)
        gram += block.T @ block
    offset = total / n
    return shift + offset, gram - n * np.outer(offset, offset), True


class _MBlocks:
    """Step 1, second pass: the blocks of M~^T + 2^40 = round((X - mu) W 2^a) + 2^40, never held whole.

    |entries of M~| <= 2^a (1 + 1e-2) by the orthonormality check, so adding 2^40 makes every entry positive and
    the cast to int64 a rounding; the y-owner removes the offset's contribution, 2^40 sum(yc~), from its share.
    Meanwhile a background thread accumulates R^T Z over the blocks (R = M~^T - Z the rounding residuals,
    Z = (X - mu) W 2^a), from which `metric_correction` corrects ||v||^2 for M's rounding.
    """

    def __init__(self, x: np.ndarray, plan: _XPlan) -> None:
        self.x, self.plan = x, plan
        self._residual_gram = np.zeros((x.shape[1], x.shape[1]))
        self._pending: list[Future[None]] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        plan = self.plan
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="x-owner-residuals") as pool:
            for start, stop in block_bounds(plan.n, BLOCK_ROWS):
                block = self.x[start:stop] - plan.mu if plan.centre_first else self.x[start:stop]
                scaled = block @ plan.w_scaled
                scaled += plan.block_offset
                encoded = scaled.astype(np.int64)
                if len(self._pending) >= 2:  # at most two blocks wait for the residual thread: bounded memory
                    self._pending.pop(0).result()
                self._pending.append(pool.submit(self._accumulate, scaled, encoded))
                yield encoded.view(RING_DTYPE)

    def _accumulate(self, scaled: np.ndarray, encoded: np.ndarray) -> None:
        residual = encoded.astype(np.float64)  # exact: entries are below 2^53
        residual -= scaled
        residual += 0.5  # R = (E - 2^40) - Z with Z = scaled - 2^40 - 1/2
        scaled -= ROUNDING_OFFSET + 0.5
        self._residual_gram += residual.T @ scaled

    def metric_correction(self) -> np.ndarray:
        """E = (A A^T)^-1 - I for A = M' Qc, M' = M~ / 2^a: ||P yc'||^2 = v'^T (I + E) v' up to M's rounding
        noise along the residual. A = U + F with F = 2^-2a (R^T Z) U, so E = -Delta + Delta^2 with
        Delta = U F^T + F U^T + F F^T (third-order terms are below 2^-90)."""
        for future in self._pending:
            future.result()
        u = self.plan.rotation
        f = np.ldexp(self._residual_gram, -2 * M_FRAC_BITS) @ u
        delta = u @ f.T + f @ u.T + f @ f.T
        correction = -delta + delta @ delta
        if not np.max(np.abs(correction)) <= 2.0 ** -CORRECTION_LIMIT_BITS:
            raise ProtocolError("the x-owner's orthogonalized data rounded far worse than expected; the x columns "
                                "are too close to collinear for this protocol")
        return correction


def _prepare_y(y: np.ndarray, column: str) -> _YPlan | None:
    """Step 2: mean, centred sum of squares and the scaled encoding of yc; None if y is constant."""
    n = y.shape[0]
    shift = float(y[0])
    ybar = shift + float(np.mean(y - shift))
    yc = y - ybar
    ss_tot = float(yc @ yc)
    norm = float(np.sqrt(ss_tot))
    if ss_tot == 0.0 or norm <= n * np.finfo(float).eps * float(np.max(np.abs(y))):
        return None  # constant, or varying only at the level of float rounding
    fy = Y_NORM_BITS - _exponent(norm)
    np.ldexp(yc, fy, out=yc)
    encoded = encode_scaled(yc)
    # SS_tot of the encoded y itself (exact integer sums: ||yc~||^2 < 2^63), so that its rounding enters SS_tot
    # and ||P yc~||^2 alike and cancels in SS_res instead of being amplified by 1 / (1 - r2).
    as_int = encoded.view(np.int64)
    total, squares = int(as_int.sum()), int(np.dot(as_int, as_int))
    ss_tot_encoded = float((squares * n - total * total) / n) * 2.0 ** (-2 * fy)
    return _YPlan(n=n, ybar=ybar, ss_tot=ss_tot_encoded, fy=fy, y_encoded=encoded)


def _random_rotation(party: Party, d: int) -> np.ndarray:
    """A Haar-random d x d rotation from the party's own PRF (QR of a Gaussian matrix, signs fixed)."""
    gaussian = party.randomness.own.normal("lr/x/rotation", d * d).reshape(d, d)
    q, r = np.linalg.qr(gaussian)
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def _exponent(value: float) -> int:
    """The e with 2^(e-1) <= value < 2^e (value > 0)."""
    return int(np.frexp(value)[1])


def _result(weights: np.ndarray, ss_tot: float, v: np.ndarray, correction: float | None, n: int,
            clock: _Clock) -> LinearRegressionResult:
    """Step 3's metrics, SS_res = SS_tot - ||P yc||^2 with ||P yc||^2 = ||v||^2 + c, and the result."""
    assert correction is not None
    ss_res = max(ss_tot - (float(v @ v) + correction), 0.0)
    result = LinearRegressionResult(
        weights=np.asarray(weights, dtype=np.float64),
        metrics={"mse_result": ss_res / n, "r_squared_result": 1.0 - ss_res / ss_tot},
    )
    # Finite inputs give finite outputs; an infinite or NaN model is no result (the coordinator refuses NaN metrics).
    if not (np.all(np.isfinite(result.weights)) and all(np.isfinite(list(result.metrics.values())))):
        raise ProtocolError("the computed weights or metrics are not finite numbers, so no model is stored; a "
                            "partner worker sent values out of range (are all workers running the same version?)")
    result.seconds = dict(clock.seconds)  # type: ignore[attr-defined]
    return result


# --- small messages -----------------------------------------------------------------------------------------

def _announce_rows(party: Party, n: int, to: tuple[int, ...]) -> None:
    name = "lr/x-rows" if party.index == X_OWNER else "lr/y-rows"
    for other in to:
        party.send(other, name, np.array([n], dtype=np.int64))


def _receive_int(party: Party, frm: int, name: str) -> int:
    return int(party.receive(frm, name, (1,), np.int64)[0])


def _check_rows(x_rows: int, y_rows: int) -> None:
    if x_rows != y_rows:
        raise RowCountsDiffer(x_rows, y_rows)


def _send_status(party: Party, name: str, status: int, to: tuple[int, ...]) -> None:
    for other in to:
        party.send(other, name, np.array([status], dtype=np.int64))


def _receive_exponent(party: Party, frm: int, name: str, allow_none: bool = False) -> int:
    """A power-of-two exponent a partner sends (kx, ky): that of a finite float64, or ky's `_NO_EXPONENT`."""
    value = _receive_int(party, frm, name)
    if value not in _EXPONENT_RANGE and not (allow_none and value == _NO_EXPONENT):
        raise _partner_sent(frm, f"{name} = {value}, not the exponent of any float64")
    return value


def _check_status(party: Party, frm: int, name: str) -> None:
    """Each data owner can stop the job for its own data only: a status is read as the sender's alone."""
    status = _receive_int(party, frm, name)
    if status == _STATUS_SINGULAR and frm == X_OWNER:
        raise ProtocolError("the x_owner stopped the job: its x columns are constant or collinear (see its error)")
    if status == _STATUS_CONSTANT_Y and frm == Y_OWNER:
        raise ProtocolError("the y_owner stopped the job: its y column is constant (see its error)")
    if status != _STATUS_OK:
        raise _partner_sent(frm, f"an unknown status ({status}) as {name}")


def _receive_meta(party: Party) -> tuple[float, int]:
    meta = party.receive(Y_OWNER, "lr/y-meta", (2,), np.float64)
    ss_tot, fy = float(meta[0]), float(meta[1])
    if not (np.isfinite(ss_tot) and ss_tot > 0):
        raise _partner_sent(Y_OWNER, "a total sum of squares that is not a positive finite number")
    if not (fy.is_integer() and int(fy) in _EXPONENT_RANGE):
        raise _partner_sent(Y_OWNER, "a scale exponent that is not a whole number in range")
    return ss_tot, int(fy)
