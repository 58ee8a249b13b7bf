"""The gateway's SLO state: backlog bookkeeping, learned rates, the decision and its explanation."""

from __future__ import annotations

import pytest

from serve_app.slo_state import SloBook, estimate_prompt_tokens


def test_estimate_prompt_tokens() -> None:
    chat = {"messages": [{"role": "user", "content": "x" * 400}]}
    assert estimate_prompt_tokens(chat, "chat") == pytest.approx((400 + 16) / 4)
    assert estimate_prompt_tokens({"prompt": "y" * 40}, "completion") == 10
    assert estimate_prompt_tokens({"prompt": ["ab", "cd"]}, "completion") == 1


def test_backlog_grows_with_sent_requests_and_shrinks_at_first_token() -> None:
    book = SloBook()
    spill, ticket, inputs = book.decide("p", "a", 1.0, ready=1, inflight=0, prompt_tokens=100)
    assert not spill and inputs["pending_prompt_tokens"] == 0
    book.sent(ticket)
    assert book.pool("p").pending_prompt_tokens == 100
    book.first_token(ticket, 0.2)
    book.first_token(ticket, 0.2)  # settles once
    assert book.pool("p").pending_prompt_tokens == 0


def test_fixed_overhead_is_learned_as_base_not_as_slow_prefill() -> None:
    """Short prompts on a slow path: the extra TTFT is overhead (base), not a slow prefill rate."""
    book = SloBook()
    book.observe_load("p", running=4, tokens_per_s=80, max_num_seqs=8)  # decode step 0.05 s
    for _ in range(30):
        _, ticket, _ = book.decide("p", "a", 1.0, ready=1, inflight=0, prompt_tokens=8)
        book.sent(ticket)
        book.first_token(ticket, 0.45)
    p = book.pool("p")
    assert p.prefill_tokens_per_s is None and p.base_s == pytest.approx(0.45 - 0.054, abs=0.01)
    _, _, inputs = book.decide("p", "a", 1.0, ready=1, inflight=0, prompt_tokens=8)
    assert inputs["predicted_ttft_ms"] == pytest.approx(450, abs=10)


def test_prefill_rate_is_learned_from_long_unqueued_prompts() -> None:
    book = SloBook()
    book.observe_load("p", running=4, tokens_per_s=80, max_num_seqs=8)  # decode step 0.05 s
    _, ticket, _ = book.decide("p", "a", 1.0, ready=1, inflight=0, prompt_tokens=1000)
    book.sent(ticket)
    book.first_token(ticket, 1.05)
    p = book.pool("p")
    assert p.prefill_tokens_per_s == pytest.approx(1000 / (1.05 - p.base_s - 0.05))
    assert p.decode_step_s == pytest.approx(0.05)


def test_a_growing_backlog_spills_and_hysteresis_holds_it() -> None:
    book = SloBook()
    book.observe_load("p", running=2, tokens_per_s=40, max_num_seqs=2)
    book.finished("p", 100)  # mean output 100 tokens: a slot frees every 100 x 0.05 / 2 = 2.5 s
    spills = []
    tickets = []
    for i in range(8):  # requests pile up on one replica faster than they start
        spill, ticket, _ = book.decide("p", "a", 1.0, ready=1, inflight=i, prompt_tokens=50)
        spills.append(spill)
        if not spill:
            book.sent(ticket)
            tickets.append(ticket)
    assert spills[:2] == [False, False] and spills[-1]
    # Load drains: the gate stays open until the prediction falls below 0.8 x SLO.
    for t in tickets:
        book.first_token(t, 0.1)
    spill, _, inputs = book.decide("p", "a", 1.0, ready=1, inflight=0, prompt_tokens=50)
    assert not spill and inputs["predicted_ttft_ms"] < 800


def test_no_ready_replica_never_spills_on_the_slo() -> None:
    book = SloBook()
    spill, ticket, inputs = book.decide("p", "a", 0.5, ready=0, inflight=3, prompt_tokens=50)
    assert not spill and ticket.predicted_raw is None and inputs["predicted_ttft_ms"] is None


def test_a_slow_first_request_does_not_inflate_the_overhead() -> None:
    """Right after deploy one request took 4.2 s on an idle pool; the next fast ones bring the learned
    overhead down at once, and requests below the batch size (no slot wait) keep teaching it."""
    book = SloBook()
    book.observe_load("p", running=1, tokens_per_s=20, max_num_seqs=4)
    _, slow, _ = book.decide("p", "a", 3.0, ready=1, inflight=0, prompt_tokens=8)
    book.sent(slow)
    book.first_token(slow, 4.2)
    assert book.pool("p").base_s > 0.5
    _, fast, _ = book.decide("p", "a", 3.0, ready=1, inflight=2, prompt_tokens=8)  # 2 of 4 slots busy
    assert fast.no_queue and not fast.backlog_empty
    book.sent(fast)
    book.first_token(fast, 0.11)
    assert book.pool("p").base_s < 0.11
