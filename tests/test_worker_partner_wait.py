"""The deadline of one wait for a partner's message (services/worker/partner_wait.py): pure, no clock."""
from __future__ import annotations

import pytest

from services.worker.partner_wait import LIMIT_TIMEOUTS, PartnerWait


def test_a_partner_that_says_nothing_is_given_up_at_the_timeout():
    wait = PartnerWait(10.0, started=100.0)
    assert wait.left(104.0) == 6.0
    assert wait.left(110.0) == 0.0
    assert not wait.extend(110.0, alive=False)
    assert wait.extensions == 0


def test_each_sign_of_life_moves_the_deadline_one_timeout_from_now():
    wait = PartnerWait(10.0, started=100.0)
    assert wait.extend(110.0, alive=True)
    assert wait.deadline == 120.0
    assert wait.extend(121.5, alive=True)  # looked a little late: the partner still gets a whole timeout
    assert wait.deadline == 131.5
    assert not wait.extend(131.5, alive=False)  # then silence for a whole timeout: given up
    assert wait.extensions == 2


def test_a_partner_alive_for_ever_holds_the_wait_only_up_to_the_limit():
    wait = PartnerWait(10.0, started=0.0)
    now = 0.0
    while now < 1000 and wait.extend(wait.deadline, alive=True):
        now = wait.deadline
    assert wait.deadline == LIMIT_TIMEOUTS * 10.0 == wait.limit
    assert wait.extensions == LIMIT_TIMEOUTS - 1
    assert not wait.extend(wait.limit, alive=True)
    late = PartnerWait(10.0, started=0.0)
    assert late.extend(LIMIT_TIMEOUTS * 10.0 - 1, alive=True) and late.deadline == late.limit  # never past it


def test_a_limit_of_one_timeout_is_the_wait_without_keep_alives():
    wait = PartnerWait(5.0, started=0.0, limit_timeouts=1)
    assert not wait.extend(5.0, alive=True)


def test_a_waiter_that_did_not_run_gives_its_partner_a_timeout_from_when_it_runs_again():
    """Suspended 30 s just before its deadline: what the partner sent meanwhile is still on its way in."""
    wait = PartnerWait(10.0, started=100.0)
    wait.resumed(139.5, stalled=30.0)
    assert wait.left(139.5) == 10.0
    assert wait.limit == 100.0 + LIMIT_TIMEOUTS * 10.0 + 30.0  # the time lost is not the partner's
    assert not wait.extend(149.5, alive=False)  # silent for a whole timeout once running again: given up
    near_limit = PartnerWait(10.0, started=0.0, limit_timeouts=1)
    near_limit.resumed(30.0, stalled=25.0)
    assert near_limit.deadline == near_limit.limit == 35.0  # never past the moved limit


@pytest.mark.parametrize("timeout, limit", [(0.0, 5), (-1.0, 5), (5.0, 0)])
def test_a_wait_needs_a_positive_timeout_and_limit(timeout, limit):
    with pytest.raises(ValueError):
        PartnerWait(timeout, started=0.0, limit_timeouts=limit)
