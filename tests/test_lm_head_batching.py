"""The coordinator's LM-head batcher (services/coordinator/lm_head.py): concurrent generations' logits in one pass.

Pure torch + threads. Waits are bounded by joins with timeouts far below the batcher's ``max_wait_s`` where a
test shows that something does NOT wait, so a regression shows up as a failure, not as a slow test."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from services.coordinator.lm_head import LogitsBatcher

HIDDEN, VOCAB = 16, 50
LONG_WAIT = 60.0  # a pass that waited this long would fail the joins below


class CountingHead:
    def __init__(self, fail_on_pass: int | None = None):
        torch.manual_seed(0)
        self.weight = torch.randn(VOCAB, HIDDEN)
        self.batches: list[int] = []
        self.fail_on_pass = fail_on_pass

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self.batches.append(hidden.shape[0])
        if self.fail_on_pass is not None and len(self.batches) == self.fail_on_pass:
            raise RuntimeError("head failed")
        return hidden @ self.weight.T


def run_members(batcher: LogitsBatcher, hiddens: list[list[torch.Tensor]], timeout: float = 20.0):
    """One thread per member, each asking for its hidden states' logits in turn; returns each member's logits."""
    results: list[list[torch.Tensor]] = [[] for _ in hiddens]
    errors: list[BaseException] = []
    start = threading.Barrier(len(hiddens))

    def member_thread(index: int):
        member = batcher.join()
        try:
            start.wait()
            for hidden in hiddens[index]:
                time.sleep(0.005)  # the step through the servers that gives the next hidden state
                results[index].append(batcher.logits(member, hidden))
        except BaseException as error:
            errors.append(error)
        finally:
            batcher.leave(member)

    threads = [threading.Thread(target=member_thread, args=(i,), daemon=True) for i in range(len(hiddens))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a member never got its logits"
    return results, errors


def test_each_member_gets_its_own_rows_logits_and_in_phase_members_share_passes():
    head = CountingHead()
    batcher = LogitsBatcher(head, max_wait_s=LONG_WAIT)
    torch.manual_seed(1)
    hiddens = [[torch.randn(HIDDEN) for _ in range(10)] for _ in range(8)]
    results, errors = run_members(batcher, hiddens)
    assert not errors
    for member_hiddens, member_logits in zip(hiddens, results):
        assert len(member_logits) == 10
        for hidden, logits in zip(member_hiddens, member_logits):
            assert logits.shape == (VOCAB,) and logits.dtype == torch.float32
            torch.testing.assert_close(logits, hidden @ head.weight.T)
    assert sum(head.batches) == 80
    # a pass waits for the previous pass's members, so members that started apart (threads starting one by one)
    # merge into one group and stay together; one pass per token would be 80
    assert 8 in head.batches and len(head.batches) <= 40, head.batches
    assert batcher.rows == 80 and batcher.passes == len(head.batches)


def test_a_lone_member_never_waits():
    batcher = LogitsBatcher(CountingHead(), max_wait_s=LONG_WAIT)
    results, errors = run_members(batcher, [[torch.randn(HIDDEN) for _ in range(10)]], timeout=10)
    assert not errors and len(results[0]) == 10


def test_a_member_that_leaves_does_not_hold_up_the_others():
    head = CountingHead()
    batcher = LogitsBatcher(head, max_wait_s=LONG_WAIT)
    # member 0 stops after 1 token (its generation ended), members 1 and 2 go on: once 0 has left, the passes
    # must not wait for it
    hiddens = [[torch.randn(HIDDEN)], [torch.randn(HIDDEN) for _ in range(6)], [torch.randn(HIDDEN) for _ in range(6)]]
    results, errors = run_members(batcher, hiddens, timeout=10)
    assert not errors and [len(r) for r in results] == [1, 6, 6]


def test_a_straggler_is_waited_for_at_most_max_wait_and_then_rejoins():
    head = CountingHead()
    batcher = LogitsBatcher(head, max_wait_s=0.2)
    a, b = batcher.join(), batcher.join()

    def both():
        threads = [threading.Thread(target=batcher.logits, args=(m, torch.randn(HIDDEN))) for m in (a, b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
            assert not thread.is_alive()

    for _ in range(10):  # the first passes depend on which thread comes first; they share one soon
        both()
        if head.batches[-1] == 2:
            break
    assert head.batches[-1] == 2, head.batches
    # b is slow now (a failover, say): a's pass waits for it at most max_wait_s, then goes alone
    thread = threading.Thread(target=batcher.logits, args=(a, torch.randn(HIDDEN)))
    thread.start(), thread.join(10)
    assert not thread.is_alive() and head.batches[-1] == 1
    # b is back: it gets its logits, and the two share passes again
    assert batcher.logits(b, torch.randn(HIDDEN)).shape == (VOCAB,)
    for _ in range(10):
        both()
        if head.batches[-1] == 2:
            break
    assert head.batches[-1] == 2, head.batches
    batcher.leave(a), batcher.leave(b)


def test_a_failing_pass_fails_only_its_requests_and_the_batcher_goes_on():
    head = CountingHead(fail_on_pass=1)
    batcher = LogitsBatcher(head, max_wait_s=LONG_WAIT)
    member = batcher.join()
    with pytest.raises(RuntimeError, match="head failed"):
        batcher.logits(member, torch.randn(HIDDEN))
    hidden = torch.randn(HIDDEN)
    torch.testing.assert_close(batcher.logits(member, hidden), hidden @ head.weight.T)
    batcher.leave(member)


def test_max_rows_caps_a_pass():
    head = CountingHead()
    batcher = LogitsBatcher(head, max_wait_s=LONG_WAIT, max_rows=3)
    results, errors = run_members(batcher, [[torch.randn(HIDDEN) for _ in range(3)] for _ in range(7)])
    assert not errors and all(len(r) == 3 for r in results)
    assert max(head.batches) <= 3 and sum(head.batches) == 21


def test_settings_are_validated():
    with pytest.raises(ValueError):
        LogitsBatcher(CountingHead(), max_wait_s=-1)
    with pytest.raises(ValueError):
        LogitsBatcher(CountingHead(), max_rows=0)


# -- the head itself: a oneDNN-packed copy (services/common/packed_linear.py) -----------------------------------

@pytest.mark.parametrize("rows", [1, 3, 8, 16])
def test_packed_head_equals_the_module(rows):
    from services.common.packed_linear import PackedHead

    torch.manual_seed(rows)
    module = torch.nn.Linear(576, 4096, bias=False)
    head = PackedHead(module)
    assert head.packed is not None
    hidden = torch.randn(rows, 576)
    with torch.inference_mode():
        torch.testing.assert_close(head(hidden), module(hidden), rtol=1e-5, atol=1e-4)
        assert head(hidden[None]).shape == (1, rows, 4096)


def test_packed_head_falls_back_to_the_module(monkeypatch):
    from services.common.packed_linear import PackedHead

    half = torch.nn.Linear(64, 128, bias=False).to(torch.bfloat16)  # not float32: not packed
    assert PackedHead(half).packed is None
    with_bias = torch.nn.Linear(64, 128)
    assert PackedHead(with_bias).packed is None
    monkeypatch.setenv("FAR_MESH_DISABLE_COMPAT_FIX", "packed_linear")
    plain = torch.nn.Linear(64, 128, bias=False)
    head = PackedHead(plain)
    assert head.packed is None
    x = torch.randn(2, 64)
    with torch.inference_mode():
        assert torch.equal(head(x), plain(x))
