"""Unit tests of the secret-sharing engine: ring, fixed point, PRFs, replicated sharing, products, reveals."""
from __future__ import annotations

import numpy as np
import pytest

from services.mpc import (FixedPointOverflow, InMemoryNetwork, Prf, ProtocolError, add, add_public, decode,
                          encode, matmul, mul, mul_public, neg, private_matvec, reveal_additive, reveal_to,
                          send_masked_vector, share_input, simulated_seeds, sub, truncate)
from services.mpc.party import Party
from services.mpc.prf import PartyRandomness, PartySeeds
from tests.support.mpc_parties import run_three

RNG = np.random.default_rng(20261125)


def ring_values(shape: tuple[int, ...]) -> np.ndarray:
    return RNG.integers(0, 2**64, size=shape, dtype=np.uint64)


# --- fixed point --------------------------------------------------------------------------------------------

def test_fixed_point_round_trip_is_within_half_a_unit() -> None:
    values = RNG.uniform(-1e6, 1e6, 10_000)
    for frac_bits in (0, 16, 36, -8):
        decoded = decode(encode(values, frac_bits), frac_bits)
        assert np.max(np.abs(decoded - values)) <= 2.0 ** -(frac_bits + 1) * (1 + 1e-12)


def test_negative_values_wrap_to_the_top_of_the_ring() -> None:
    encoded = encode(np.array([-1.0, 1.0]), 4)
    assert encoded.tolist() == [2**64 - 16, 16]


def test_fixed_point_overflow_names_the_quantity_not_the_value() -> None:
    with pytest.raises(FixedPointOverflow) as caught:
        encode(np.array([1.0, 123456789.0]), 40, what="column 'income'")
    message = str(caught.value)
    assert "column 'income'" in message and "40 fractional bits" in message
    assert "123456789" not in message


# --- PRFs ---------------------------------------------------------------------------------------------------

def test_prf_streams_are_deterministic_and_domain_separated() -> None:
    seed = bytes(range(32))
    a, b = Prf(seed), Prf(seed)
    assert np.array_equal(a.words("x", 1000), b.words("x", 1000))
    assert np.array_equal(a.words("x", 10), a.words("x", 1000)[:10])  # a stream is a prefix-stable sequence
    assert not np.array_equal(a.words("x", 100), a.words("y", 100))
    assert not np.array_equal(a.words("x", 100), Prf(bytes(32)).words("x", 100))


def test_prf_output_bytes_are_uniform() -> None:
    counts = np.bincount(Prf(bytes(32)).words("uniformity", 1 << 16).view(np.uint8), minlength=256)
    expected = counts.sum() / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 330.5  # chi-square, 255 degrees of freedom, alpha = 0.001


def test_zero_shares_sum_to_zero_and_seeds_are_pairwise() -> None:
    seeds = simulated_seeds(b"zero-share")
    for i in range(3):
        assert seeds[i].next == seeds[(i + 1) % 3].prev and seeds[i].own not in (seeds[i].next, seeds[i].prev)
    shares = [PartyRandomness(i, seeds[i]).zero_share("z", (5, 7)) for i in range(3)]
    assert not np.array_equal(shares[0], np.zeros((5, 7), np.uint64))
    assert np.array_equal(shares[0] + shares[1] + shares[2], np.zeros((5, 7), np.uint64))


def test_seeds_must_be_32_bytes_and_are_never_printed() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        PartySeeds(prev=b"short", next=bytes(32), own=bytes(32))
    seeds = simulated_seeds(b"repr")[0]
    assert seeds.prev.hex() not in repr(seeds) and "redacted" in repr(seeds)


# --- replicated sharing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("owner", [0, 1, 2])
@pytest.mark.parametrize("target", [0, 1, 2])
def test_share_and_reveal_to_one_party_only(owner: int, target: int) -> None:
    secret = ring_values((4, 3))
    network = InMemoryNetwork(timeout=5.0, record=True)

    def step(party: Party):
        share = share_input(party, "s", owner, secret if party.index == owner else None, secret.shape)
        return share, reveal_to(party, "open", share, target)

    results = run_three(step, network=network)
    assert np.array_equal(results[target][1], secret)
    assert all(results[i][1] is None for i in range(3) if i != target)
    # Party i holds (x_i, x_{i+1}): consecutive parties agree on the share they have in common.
    for i in range(3):
        assert np.array_equal(results[i][0].second, results[(i + 1) % 3][0].first)
    # Only the target received anything in the opening step.
    for i in range(3):
        opened = [name for _, name, _ in network.received[i] if name == "open"]
        assert opened == (["open"] if i == target else [])


def test_one_partys_shares_do_not_contain_the_secret() -> None:
    secret = np.full(64, 7, dtype=np.uint64)
    shares = run_three(lambda p: share_input(p, "s", 0, secret if p.index == 0 else None, (64,)))
    for share in shares:
        for component in (share.first, share.second):
            assert not np.array_equal(component, secret)
            assert len(np.unique(component)) == 64  # random words, not a function of the constant secret


def _shared_pair(party: Party, x: np.ndarray, y: np.ndarray):
    return (share_input(party, "x", 0, x if party.index == 0 else None, x.shape),
            share_input(party, "y", 1, y if party.index == 1 else None, y.shape))


def test_linear_operations() -> None:
    x, y = ring_values((6,)), ring_values((6,))
    c = np.uint64(12345)

    def step(party: Party):
        sx, sy = _shared_pair(party, x, y)
        out = {}
        for name, share in {"add": add(sx, sy), "sub": sub(sx, sy), "neg": neg(sx),
                            "add_public": add_public(party, sx, c), "mul_public": mul_public(sx, c)}.items():
            out[name] = reveal_to(party, f"open/{name}", share, 2)
        return out

    opened = run_three(step)[2]
    assert np.array_equal(opened["add"], x + y)
    assert np.array_equal(opened["sub"], x - y)
    assert np.array_equal(opened["neg"], -x)
    assert np.array_equal(opened["add_public"], x + c)
    assert np.array_equal(opened["mul_public"], x * c)


def test_multiplication_is_exact_in_the_ring() -> None:
    x, y = ring_values((50,)), ring_values((50,))

    def step(party: Party):
        sx, sy = _shared_pair(party, x, y)
        return reveal_to(party, "open", mul(party, "xy", sx, sy), 1)

    assert np.array_equal(run_three(step)[1], x * y)


def test_matrix_product_is_exact_in_the_ring() -> None:
    x, y = ring_values((5, 7)), ring_values((7, 3))

    def step(party: Party):
        sx, sy = _shared_pair(party, x, y)
        return reveal_to(party, "open", matmul(party, "xy", sx, sy), 0)

    assert np.array_equal(run_three(step)[0], x @ y)


def test_fixed_point_product_with_truncation_is_within_one_unit() -> None:
    frac = 16
    x, y = RNG.uniform(-8, 8, 20_000), RNG.uniform(-8, 8, 20_000)
    ex, ey = encode(x, frac), encode(y, frac)

    def step(party: Party):
        sx, sy = _shared_pair(party, ex, ey)
        product = mul(party, "xy", sx, sy)
        return reveal_to(party, "open", truncate(party, "trunc", product, frac), 2)

    result = run_three(step, seeds=simulated_seeds(b"truncation"))[2].view(np.int64)
    exact = (ex.view(np.int64).astype(object) * ey.view(np.int64).astype(object))
    expected = np.array([int(v) >> frac for v in exact], dtype=np.int64)
    # The documented bound: off by at most one unit in the last place; |x y| < 2^38 here, so the probability of
    # a large error is below 2^(38 + 1 - 64) = 2^-25 per value.
    assert np.max(np.abs(result - expected)) <= 1
    assert np.max(np.abs(decode(result.view(np.uint64), frac) - x * y)) < 2.0 ** -frac * 20


def test_reusing_a_step_name_is_refused() -> None:
    party = Party.create(0, InMemoryNetwork().transport(0), simulated_seeds()[0])
    party.claim("step")
    with pytest.raises(ProtocolError, match="used twice"):
        party.claim("step")


# --- private product and additive opening -------------------------------------------------------------------

@pytest.mark.parametrize(("matrix_owner", "vector_owner"), [(0, 1), (2, 1), (1, 0)])
def test_private_product_shares_sum_to_the_product(matrix_owner: int, vector_owner: int) -> None:
    n, m, block_rows = 1000, 4, 300  # the last block is short
    b = ring_values((n, m))  # B = M^T, as the matrix owner streams it
    y = ring_values((n,))
    network = InMemoryNetwork(timeout=5.0, record=True)
    helper = 3 - matrix_owner - vector_owner

    def step(party: Party):
        blocks = ([b[s:s + block_rows] for s in range(0, n, block_rows)] if party.index == matrix_owner else None)
        return private_matvec(party, "p", matrix_owner=matrix_owner, vector_owner=vector_owner, n=n, m=m,
                              blocks=blocks, vector=y if party.index == vector_owner else None,
                              block_rows=block_rows)

    shares = run_three(step, network=network)
    assert np.array_equal(shares[0] + shares[1] + shares[2], y @ b)
    assert network.received[helper] == []  # the helper only expands PRFs
    assert [name for _, name, _ in network.received[vector_owner]] == [f"p/M-S/{k}" for k in range(4)]
    assert [name for _, name, _ in network.received[matrix_owner]] == ["p/y-r"]
    assert network.bytes_sent[matrix_owner] == n * m * 8 and network.bytes_sent[vector_owner] == n * 8
    assert network.rounds[matrix_owner] == 1 and network.rounds[vector_owner] == 1


def test_vector_sent_ahead_gives_the_same_shares_and_messages() -> None:
    """`send_masked_vector` first (the vector owner sends before it waits for anything), then the product."""
    n, m, block_rows = 700, 3, 256
    b, y = ring_values((n, m)), ring_values((n,))
    seeds = simulated_seeds()  # the same for both runs, so their shares can be compared

    def run(ahead: bool) -> tuple[list, InMemoryNetwork]:
        network = InMemoryNetwork(timeout=5.0, record=True)

        def step(party: Party):
            if party.index == 1 and ahead:
                send_masked_vector(party, "p", matrix_owner=0, vector_owner=1, n=n, vector=y)
                party.receive(0, "hello", (1,))  # only now does the vector owner wait for the matrix owner
            if party.index == 0:
                party.send(1, "hello", np.zeros(1, dtype=np.uint64))
            blocks = [b[s:s + block_rows] for s in range(0, n, block_rows)] if party.index == 0 else None
            return private_matvec(party, "p", matrix_owner=0, vector_owner=1, n=n, m=m, blocks=blocks,
                                  vector=y if party.index == 1 else None, block_rows=block_rows,
                                  vector_sent=ahead and party.index == 1)

        return run_three(step, network=network, seeds=seeds), network

    (ahead_shares, ahead_net), (plain_shares, plain_net) = run(True), run(False)
    assert all(np.array_equal(a, p) for a, p in zip(ahead_shares, plain_shares))
    assert np.array_equal(ahead_shares[0] + ahead_shares[1] + ahead_shares[2], y @ b)
    sent = {name: array.tobytes() for _, name, array in ahead_net.received[0]}
    assert sent == {name: array.tobytes() for _, name, array in plain_net.received[0]}  # the same y - r


def test_only_the_vector_owner_sends_the_masked_vector() -> None:
    party = Party.create(0, InMemoryNetwork(timeout=1.0).transport(0), simulated_seeds()[0])
    with pytest.raises(ValueError, match="only the vector owner"):
        send_masked_vector(party, "p", matrix_owner=0, vector_owner=1, n=3, vector=ring_values((3,)))


def test_private_product_rejects_blocks_that_do_not_fit() -> None:
    def step(party: Party):
        blocks = [ring_values((10, 2))] if party.index == 0 else None
        return private_matvec(party, "p", matrix_owner=0, vector_owner=1, n=12, m=2, blocks=blocks,
                              vector=ring_values((12,)) if party.index == 1 else None, block_rows=12)

    network = InMemoryNetwork(timeout=0.5)
    with pytest.raises(ProtocolError, match="block 0 has shape"):
        run_three(step, network=network)


def test_a_share_of_another_shape_is_refused_not_broadcast() -> None:
    """A peer sending (N, 1) where a (d,) share is expected would make the opened value N x d; it is refused."""
    def step(party: Party):
        if party.index == 0:  # a faulty party 0: its masked share under the right name, in the wrong shape
            party.claim("open")
            party.send(1, "open/0", ring_values((1000, 1)))
            return None
        return reveal_additive(party, "open", ring_values((8,)), 1)

    with pytest.raises(ProtocolError, match=r"party 0 sent 'open/0' as uint64 \(1000, 1\), expected uint64 \(8,\)"):
        run_three(step, network=InMemoryNetwork(timeout=2.0))


def test_additive_opening_gives_the_sum_to_the_target_only() -> None:
    parts = [ring_values((8,)) for _ in range(3)]
    network = InMemoryNetwork(timeout=5.0, record=True)
    opened = run_three(lambda p: reveal_additive(p, "open", parts[p.index], 1), network=network)
    assert np.array_equal(opened[1], parts[0] + parts[1] + parts[2])
    assert opened[0] is None and opened[2] is None
    received = network.received[1]
    assert sorted(name for _, name, _ in received) == ["open/0", "open/2"]
    # Re-randomized: what arrives is not the sender's plain share.
    for frm, _, array in received:
        assert not np.array_equal(array, parts[frm])
    assert network.received[0] == [] and network.received[2] == []
