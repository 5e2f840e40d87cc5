"""Product of one party's private matrix with another party's private vector, a third party helping.

The matrix owner holds M (m x n), the vector owner holds y (n), the helper holds nothing. With S (m x n) from
the PRF shared by the matrix owner and the helper, and r (n) from the PRF shared by the vector owner and the
helper:

    matrix owner -> vector owner:  M - S         (uniform: the vector owner does not know S)
    vector owner -> matrix owner:  y - r         (uniform: the matrix owner does not know r)
    shares:  vector owner (M - S) y,   matrix owner S (y - r),   helper S r,   summing to M y.

One round, m*n + n words, no truncation; the helper receives nothing. This is the "helper-assisted" form of
a Beaver-style product (Beaver, CRYPTO 1991) where the dealer is the third party and its correlated
randomness comes from the pairwise seeds instead of being sent. The result is a 3-out-of-3 additive sharing
(one ring array per party); open it with `additive.reveal_additive`.

M is handed over as blocks of B = M^T (rows of n, the way data is stored), so the matrix owner can stream a
matrix it never holds whole: block k holds rows [k*block_rows, (k+1)*block_rows) of B.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from services.mpc.errors import ProtocolError
from services.mpc.party import Party
from services.mpc.ring import RING_DTYPE, as_ring, vec_mat, zeros


T = TypeVar("T")


def block_bounds(n: int, block_rows: int) -> Iterator[tuple[int, int]]:
    """The (start, stop) row ranges of the blocks of an n-row matrix."""
    for start in range(0, n, block_rows):
        yield start, min(n, start + block_rows)


def prefetched(make: Callable[[int], T], count: int) -> Iterator[T]:
    """Yield make(0) .. make(count - 1), computing the next item in a background thread meanwhile.

    Used for the PRF masks: AES and numpy release the GIL, so generating block k+1 overlaps using block k.
    """
    if count <= 1:
        yield from (make(k) for k in range(count))
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prf-prefetch") as pool:
        future = pool.submit(make, 0)
        for k in range(count):
            current = future.result()
            if k + 1 < count:
                future = pool.submit(make, k + 1)
            yield current


def _helper_of(matrix_owner: int, vector_owner: int) -> int:
    helper = 3 - matrix_owner - vector_owner
    if {matrix_owner, vector_owner, helper} != {0, 1, 2}:
        raise ProtocolError("the matrix owner, vector owner and helper must be three different parties")
    return helper


def send_masked_vector(party: Party, name: str, *, matrix_owner: int, vector_owner: int, n: int,
                       vector: np.ndarray) -> None:
    """The vector owner's first move in `private_matvec(name)`: send y - r to the matrix owner.

    Called ahead of `private_matvec(..., vector_sent=True)` when the vector owner can send before it is ready to
    receive (y - r is uniform to the matrix owner, so sending early reveals nothing): the matrix owner then never
    waits for it, which saves a round trip on a slow transport.
    """
    party.claim(name)
    helper = _helper_of(matrix_owner, vector_owner)
    if party.index != vector_owner:
        raise ValueError("only the vector owner sends the masked vector")
    y = as_ring(vector)
    if y.shape != (n,):
        raise ProtocolError(f"the vector has {y.shape[0] if y.ndim else 0} entries, expected {n}")
    r = party.randomness.shared_with(helper).array(f"{name}/r", n)
    party.send(matrix_owner, f"{name}/y-r", y - r)


def private_matvec(party: Party, name: str, *, matrix_owner: int, vector_owner: int, n: int, m: int,
                   blocks: Iterable[np.ndarray] | None = None, vector: np.ndarray | None = None,
                   block_rows: int = 1 << 15, vector_sent: bool = False) -> np.ndarray:
    """This party's additive share (m ring elements) of M y = B^T y.

    The matrix owner passes `blocks` (ring arrays of shape (rows, m), in order, covering n rows in blocks of
    `block_rows`), the vector owner passes `vector` (n ring elements); `n`, `m` and `block_rows` are public.
    `vector_sent` (vector owner only): `send_masked_vector` already sent y - r for this name.
    """
    i = party.index
    helper = _helper_of(matrix_owner, vector_owner)
    share = zeros(m)
    if i == vector_owner:
        if vector is None:
            raise ValueError("the vector owner must provide the vector")
        if not vector_sent:
            send_masked_vector(party, name, matrix_owner=matrix_owner, vector_owner=vector_owner, n=n,
                               vector=vector)
        y = as_ring(vector)
        for k, (start, stop) in enumerate(block_bounds(n, block_rows)):
            masked = party.receive(matrix_owner, f"{name}/M-S/{k}", (stop - start, m))
            share += vec_mat(y[start:stop], masked)
        return share
    party.claim(name)
    if i == matrix_owner:
        if blocks is None:
            raise ValueError("the matrix owner must provide the matrix blocks")
        y_minus_r = party.receive(vector_owner, f"{name}/y-r", (n,))
        prf = party.randomness.shared_with(helper)
        bounds = list(block_bounds(n, block_rows))

        def mask_and_share(k: int) -> tuple[np.ndarray, np.ndarray]:  # S_k and S_k^T (y - r)_k, off the main thread
            start, stop = bounds[k]
            s = prf.array(f"{name}/S/{k}", (stop - start, m))
            return s, vec_mat(y_minus_r[start:stop], s)

        masks = prefetched(mask_and_share, len(bounds))
        count = 0
        for k, block in enumerate(blocks):
            if k >= len(bounds) or block.shape != (bounds[k][1] - bounds[k][0], m):
                raise ProtocolError(f"matrix block {k} has shape {block.shape}, which does not fit {n} x {m} "
                                    f"in blocks of {block_rows} rows")
            s, part = next(masks)
            share += part
            s = np.subtract(as_ring(block), s, out=s)
            party.send(vector_owner, f"{name}/M-S/{k}", s)
            count += 1
        if count != len(bounds):
            raise ProtocolError(f"the matrix owner supplied {count} blocks, expected {len(bounds)}")
        return share
    prf_s = party.randomness.shared_with(matrix_owner)
    r = party.randomness.shared_with(vector_owner).array(f"{name}/r", n)
    bounds = list(block_bounds(n, block_rows))
    masks = prefetched(lambda k: prf_s.array(f"{name}/S/{k}", (bounds[k][1] - bounds[k][0], m)), len(bounds))
    for (start, stop), s in zip(bounds, masks):
        share += vec_mat(r[start:stop], s)
    return share.astype(RING_DTYPE, copy=False)
