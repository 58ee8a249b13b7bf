"""Table tests of the TTFT model, its online correction, the SLO gate and the autoscaler target."""

from __future__ import annotations

import math

import pytest

from serve_app.slo import (
    PoolRates,
    ReplicaBacklog,
    SloGate,
    TTFTPredictor,
    expected_power_of_two,
    replica_ttft_s,
    slo_target_ongoing,
)

# 1000 prompt tokens/s, 50 ms steps, 4 slots, 100-token answers, 512-token chunks.
RATES = PoolRates(
    prefill_tokens_per_s=1000, decode_step_s=0.05, max_num_seqs=4, mean_output_tokens=100, chunk_tokens=512
)
IDLE = ReplicaBacklog(inflight=0, prefill_tokens=0)


@pytest.mark.parametrize(
    ("rates", "backlog", "prompt", "expected"),
    [
        (RATES, IDLE, 100, 0.1 + 0.05),  # prefill + one step
        (RATES, IDLE, 0, 0.05),
        (RATES, ReplicaBacklog(2, 400), 100, 0.5 + 0.05),  # behind 400 tokens of prefill
        (RATES, ReplicaBacklog(2, 924), 100, 1.024 + 2 * 0.05),  # 1024 tokens: two 512-token chunks
        (RATES, ReplicaBacklog(3, 0), 100, 0.15),  # a slot is free: no wait
        (RATES, ReplicaBacklog(4, 0), 100, 1 * 100 * 0.05 / 4 + 0.15),  # full: wait for one slot
        (RATES, ReplicaBacklog(6, 200), 100, 3 * 100 * 0.05 / 4 + 0.3 + 0.05),  # two ahead of us
        (PoolRates(1000, 0.05), ReplicaBacklog(40, 0), 100, 0.15),  # no slot model: no slot wait
        (PoolRates(1000, 0.05, chunk_tokens=None), ReplicaBacklog(0, 4000), 0, 4.05),  # one step
        (RATES, ReplicaBacklog(0, -5), 100, 0.15),  # a negative backlog (bookkeeping race) is zero
    ],
)
def test_replica_ttft(rates: PoolRates, backlog: ReplicaBacklog, prompt: float, expected: float) -> None:
    assert replica_ttft_s(rates, backlog, prompt) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([2.0], 2.0),
        ([1.0, 3.0], 1.0),  # the only pair
        ([1.0, 2.0, 3.0], (1 + 1 + 2) / 3),  # pairs (1,2) (1,3) (2,3)
        ([5.0, 5.0, 5.0, 5.0], 5.0),
        ([4.0, 0.0, 0.0, 0.0], 0.0),  # every pair holds an idle replica
        ([0.0, 9.0, 9.0, 9.0], (0 * 3 + 9 * 3) / 6),  # half the pairs avoid the idle replica
    ],
)
def test_expected_power_of_two(values: list[float], expected: float) -> None:
    assert expected_power_of_two(values) == pytest.approx(expected)


def test_predictor_says_nothing_without_rates_or_replicas() -> None:
    p = TTFTPredictor()
    assert p.predict([IDLE], 100) is None
    p.set_rates(PoolRates(prefill_tokens_per_s=0, decode_step_s=0.05))
    assert p.predict([IDLE], 100) is None
    p.set_rates(RATES)
    assert p.predict([], 100) is None
    assert p.predict([IDLE], 100) == pytest.approx(0.15)


def test_correction_converges_to_the_observed_ratio() -> None:
    p = TTFTPredictor(RATES, alpha=0.2)
    raw = p.predict_raw([IDLE], 100)
    assert raw is not None
    for _ in range(40):
        p.observe(raw, 2 * raw)  # the pool is twice as slow as measured
    assert p.correction == pytest.approx(2.0, rel=1e-3)
    assert p.predict([IDLE], 100) == pytest.approx(2 * raw, rel=1e-3)
    assert p.observations == 40


@pytest.mark.parametrize(
    ("predicted", "actual", "correction"),
    [
        (0.1, 0.2, 1.0 + 0.5 * (2.0 - 1.0)),
        (0.1, 100.0, 1.0 + 0.5 * (5.0 - 1.0)),  # one outlier moves it at most to the clip
        (0.1, 0.0, 1.0 + 0.5 * (0.2 - 1.0)),
        (0.0, 1.0, 1.0),  # nothing to compare with: ignored
        (0.1, -1.0, 1.0),
        (0.1, math.inf, 1.0),
        (math.nan, 1.0, 1.0),
    ],
)
def test_observe(predicted: float, actual: float, correction: float) -> None:
    p = TTFTPredictor(RATES, alpha=0.5)
    p.observe(predicted, actual)
    assert p.correction == pytest.approx(correction)


def test_alpha_is_validated() -> None:
    with pytest.raises(ValueError):
        TTFTPredictor(alpha=0)


# (predictions in order, expected decisions) for an SLO of 1 s, enter 1.0, exit 0.8
GATE_CASES = [
    ("below stays", [0.5, 0.9, 0.99], [False, False, False]),
    ("enter at the SLO", [0.9, 1.0], [False, True]),
    ("hysteresis holds between exit and enter", [1.2, 0.9, 0.81, 0.95], [True, True, True, True]),
    ("leave below exit", [1.2, 0.79, 0.9], [True, False, False]),
    ("re-enter only at the SLO again", [1.2, 0.5, 0.95, 1.01], [True, False, False, True]),
    ("blind never spills on the SLO and resets", [1.5, None, 0.9], [True, False, False]),
]


@pytest.mark.parametrize(("predictions", "expected"), [c[1:] for c in GATE_CASES], ids=[c[0] for c in GATE_CASES])
def test_slo_gate(predictions: list[float | None], expected: list[bool]) -> None:
    gate = SloGate(slo_s=1.0)
    assert [gate.update(p) for p in predictions] == expected
    assert gate.last_predicted_s == predictions[-1]


@pytest.mark.parametrize(("kw"), [{"slo_s": 0}, {"slo_s": 1, "exit": 1.2}, {"slo_s": 1, "exit": 0}])
def test_slo_gate_validates(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SloGate(**kw)


@pytest.mark.parametrize(
    ("slo_s", "expected"),
    [
        # 100-token prompts: 0.15 s alone; each request beyond the 4 slots adds 1.25 s + 0.1 s prefill.
        (0.1, 1.0),  # even alone over budget: the best a replica can do
        (1.0, 4.0),  # 3 in flight + this one; a 4th in flight means a slot wait of 1.25 s
        (2.0, 5.0),  # one slot wait fits in 1.6 s: 4 in flight + this one
        (4.0, 6.0),
    ],
)
def test_slo_target_ongoing(slo_s: float, expected: float) -> None:
    assert slo_target_ongoing(RATES, slo_s, mean_prompt_tokens=100) == expected


def test_slo_target_follows_the_correction_and_needs_a_slot_model() -> None:
    assert slo_target_ongoing(RATES, 2.0, 100, correction=2.0) == 4.0  # twice as slow: one fewer
    assert slo_target_ongoing(PoolRates(1000, 0.05), 1.0, 100) is None  # no max_num_seqs
    assert slo_target_ongoing(PoolRates(1000, 0.05, max_num_seqs=4), 1.0, 100) is None  # no output length
    assert slo_target_ongoing(PoolRates(0, 0.05, max_num_seqs=4, mean_output_tokens=10), 1.0, 100) is None
