"""TTFT prediction for SLO-driven spill: pure, clock-free, table-tested.

A route may set `ttft_slo_ms`. Before the first byte the gateway asks: if this request went to the pool
now, when would its first token arrive? It knows, to the millisecond, what it has in flight on each
replica (requests and the prompt tokens still to prefill), while engine gauges lag seconds. The model
per replica, for a request of P prompt tokens:

    slot_wait = 0                                              while in-flight < max_num_seqs
              = (in-flight - max_num_seqs + 1) x mean_output_tokens x decode_step_s / max_num_seqs
    tokens    = prefill backlog (prompt tokens of in-flight requests without a first token) + P
    ttft      = slot_wait + tokens / prefill_tokens_per_s + ceil(tokens / chunk_tokens) x decode_step_s

(each scheduler step that prefills a chunk also decodes the running batch, so it costs a decode step on
top of the chunk's prefill time). Ray's router picks the less loaded of two random replicas, so the
pool's prediction is the expected minimum of two distinct replicas' TTFTs. The raw model is then scaled
by an online correction: an EWMA of observed / predicted TTFT over the requests the pool served.

`SloGate` turns predictions into spill / no-spill with hysteresis (enter above enter x SLO, leave only
below exit x SLO). `slo_target_ongoing` gives the autoscaler the in-flight-per-replica target at which a
mean request still meets exit x SLO, so scaling aims below the point where spill starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# A single observation may not move the correction outside this range (a GC pause, a network blip).
_RATIO_MIN, _RATIO_MAX = 0.2, 5.0


@dataclass(frozen=True, slots=True)
class PoolRates:
    """The pool's measured speeds (from its replicas' stats), per replica."""

    prefill_tokens_per_s: float  # prompt tokens a replica prefills per second
    decode_step_s: float  # one scheduler step of the running batch
    max_num_seqs: int | None = None  # sequences a replica decodes at once (None: never a slot wait)
    mean_output_tokens: float = 0.0  # recent mean completion length (for the slot wait)
    chunk_tokens: int | None = None  # prefill tokens per step (max_num_batched_tokens); None: one step

    @property
    def usable(self) -> bool:
        return self.prefill_tokens_per_s > 0 and self.decode_step_s >= 0


@dataclass(frozen=True, slots=True)
class ReplicaBacklog:
    """What this gateway has in flight on one replica."""

    inflight: int  # requests sent and not finished
    prefill_tokens: float  # prompt tokens of those that have no first token yet


def replica_ttft_s(rates: PoolRates, backlog: ReplicaBacklog, prompt_tokens: float) -> float:
    """The raw model: a new request's TTFT on one replica (seconds)."""
    slot_wait = 0.0
    if rates.max_num_seqs is not None and backlog.inflight >= rates.max_num_seqs:
        ahead = backlog.inflight - rates.max_num_seqs + 1
        slot_wait = ahead * rates.mean_output_tokens * rates.decode_step_s / rates.max_num_seqs
    tokens = max(0.0, backlog.prefill_tokens) + max(0.0, prompt_tokens)
    steps = max(1, math.ceil(tokens / rates.chunk_tokens)) if rates.chunk_tokens else 1
    return slot_wait + tokens / rates.prefill_tokens_per_s + steps * rates.decode_step_s


def expected_power_of_two(values: Sequence[float]) -> float:
    """E[min(a, b)] for two distinct replicas drawn at random (one replica: its own value)."""
    n = len(values)
    if n == 1:
        return values[0]
    ordered = sorted(values)
    pairs = n * (n - 1) / 2
    # The i-th smallest (0-based) is the minimum of the pairs it forms with the n - 1 - i larger ones.
    return sum(v * (n - 1 - i) for i, v in enumerate(ordered)) / pairs


class TTFTPredictor:
    """Per pool: predicts TTFT from the gateway's backlog, corrected online by observed TTFTs."""

    def __init__(self, rates: PoolRates | None = None, alpha: float = 0.2) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.rates = rates
        self.alpha = alpha
        self.correction = 1.0  # EWMA of observed / predicted
        self.observations = 0

    def set_rates(self, rates: PoolRates | None) -> None:
        """New measured speeds (None: unknown, e.g. no replica has reported yet)."""
        self.rates = rates

    def predict_raw(self, replicas: Sequence[ReplicaBacklog], prompt_tokens: float) -> float | None:
        """The uncorrected model; None when it cannot say (no replicas, no usable rates)."""
        rates = self.rates
        if rates is None or not rates.usable or not replicas:
            return None
        return expected_power_of_two([replica_ttft_s(rates, r, prompt_tokens) for r in replicas])

    def predict(self, replicas: Sequence[ReplicaBacklog], prompt_tokens: float) -> float | None:
        """Predicted TTFT in seconds for a new request of `prompt_tokens`, or None (fall back to the
        fixed thresholds). Pass the raw prediction back to `observe` with the TTFT the request saw."""
        raw = self.predict_raw(replicas, prompt_tokens)
        return None if raw is None else raw * self.correction

    def observe(self, predicted_raw: float, actual_s: float) -> None:
        """Learn from one request the pool served: `predicted_raw` is `predict_raw` at dispatch time."""
        if predicted_raw <= 0 or actual_s < 0 or not math.isfinite(actual_s) or not math.isfinite(predicted_raw):
            return
        ratio = min(_RATIO_MAX, max(_RATIO_MIN, actual_s / predicted_raw))
        self.correction += self.alpha * (ratio - self.correction)
        self.observations += 1


@dataclass(slots=True)
class SloGate:
    """Spill when the predicted TTFT reaches enter x SLO; stop only when it falls below exit x SLO."""

    slo_s: float
    enter: float = 1.0
    exit: float = 0.8
    spilling: bool = False
    last_predicted_s: float | None = None  # the input of the last decision (for the request log)

    def __post_init__(self) -> None:
        if self.slo_s <= 0:
            raise ValueError(f"slo_s must be > 0, got {self.slo_s}")
        if not 0 < self.exit <= self.enter:
            raise ValueError(f"need 0 < exit ({self.exit}) <= enter ({self.enter})")

    def update(self, predicted_s: float | None) -> bool:
        """The decision for a request with this prediction. None (cannot predict) never spills on the
        SLO and resets the state: the fixed thresholds stay the guard while the model is blind."""
        self.last_predicted_s = predicted_s
        if predicted_s is None:
            self.spilling = False
        elif self.spilling:
            self.spilling = predicted_s >= self.exit * self.slo_s
        else:
            self.spilling = predicted_s >= self.enter * self.slo_s
        return self.spilling


def slo_target_ongoing(
    rates: PoolRates,
    slo_s: float,
    mean_prompt_tokens: float,
    correction: float = 1.0,
    headroom: float = 0.8,
    limit: int = 1024,
) -> float | None:
    """The largest in-flight count per replica at which a mean request still meets headroom x SLO.

    At steady state the requests in the batch have been prefilled; those beyond max_num_seqs still wait
    for a slot and for their prefill. None when the rates are unusable. At least 1 (a request alone on
    a replica is the best a replica can do; the autoscaler's max_replicas bounds the rest). None also
    when max_num_seqs or the mean output length is unknown.
    """
    if not rates.usable or slo_s <= 0 or rates.max_num_seqs is None or rates.mean_output_tokens <= 0:
        return None  # without a slot model, in-flight count says nothing about TTFT
    budget = headroom * slo_s
    best = 1
    for n in range(1, limit + 1):
        waiting = max(0, n - (rates.max_num_seqs or n))
        backlog = ReplicaBacklog(inflight=n, prefill_tokens=waiting * mean_prompt_tokens)
        if replica_ttft_s(rates, backlog, mean_prompt_tokens) * correction > budget:
            break
        best = n + 1  # n requests in flight leave room for this one: n + 1 ongoing
    return float(best)
