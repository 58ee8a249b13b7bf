"""The gateway's live inputs to SLO spill: per pool, what it has in flight and the pool's measured speeds.

`serve_app.slo` is the pure model; this module keeps the state it needs, fed by what the gateway sees:
- the backlog: requests in flight on the pool and the prompt tokens of those still waiting for their
  first token (known to the millisecond here, unlike the engines' gauges, which lag seconds);
- the decode step: from the replicas' reports (running sequences / generated tokens per second);
- a fixed base: the TTFT of a request with nothing ahead of it, beyond what the model predicts for it
  (gateway and Ray hops, scheduling): learned from first tokens that arrived with an empty backlog;
- the prefill rate: learned from long prompts that arrived with an empty backlog, before that a prior;
- the online correction of the load-dependent part: every first token that arrived behind a backlog is
  compared with what was predicted for it.
Predicted TTFT = base + model(backlog, prompt) x correction.
Prompt tokens are estimated from the request's text (about 4 characters a token): the correction absorbs
the bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serve_app.slo import PoolRates, ReplicaBacklog, SloGate, TTFTPredictor

_PRIOR_PREFILL_TOKENS_PER_S = 2000.0
_PRIOR_DECODE_STEP_S = 0.05
_EWMA = 0.2
_LEARN_PREFILL_FROM_TOKENS = 512  # shorter prompts say more about fixed overhead than about prefill speed
CHARS_PER_TOKEN = 4.0


def estimate_prompt_tokens(body: dict[str, Any], kind: str) -> float:
    """A cheap estimate of a request's prompt tokens (text length / 4, plus a little per message)."""
    if kind == "chat":
        total = 0
        for msg in body.get("messages") or []:
            if isinstance(msg, dict):
                content = msg.get("content")
                if isinstance(content, str):
                    total += len(content)
                elif isinstance(content, list):
                    total += sum(len(str(p.get("text", ""))) for p in content if isinstance(p, dict))
                total += 16  # role and template tokens
        return total / CHARS_PER_TOKEN
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return sum(len(p) if isinstance(p, str) else 1 for p in prompt) / CHARS_PER_TOKEN
    return len(str(prompt or "")) / CHARS_PER_TOKEN


@dataclass
class SloTicket:
    """What was predicted for one request (compared with its TTFT when the first token arrives)."""

    pool: str
    prompt_tokens: float
    predicted_raw: float | None
    backlog_empty: bool  # nothing in flight: the TTFT is overhead + this request's own prefill
    no_queue: bool  # fewer in flight than the engine batches: no slot wait expected
    waiting: bool = True  # still counted in the pool's prefill backlog


@dataclass
class PoolSlo:
    predictor: TTFTPredictor = field(default_factory=TTFTPredictor)
    gates: dict[str, SloGate] = field(default_factory=dict)  # per route alias
    pending_prompt_tokens: float = 0.0
    prefill_tokens_per_s: float | None = None
    decode_step_s: float | None = None
    max_num_seqs: int | None = None
    mean_output_tokens: float = 0.0
    mean_prompt_tokens: float = 0.0
    base_s: float = 0.0  # TTFT with nothing ahead, beyond the model (hops, scheduling)

    def rates(self) -> PoolRates:
        return PoolRates(
            prefill_tokens_per_s=self.prefill_tokens_per_s or _PRIOR_PREFILL_TOKENS_PER_S,
            decode_step_s=self.decode_step_s if self.decode_step_s is not None else _PRIOR_DECODE_STEP_S,
            max_num_seqs=self.max_num_seqs,
            mean_output_tokens=self.mean_output_tokens,
        )


class SloBook:
    """Per-pool SLO state of one gateway replica."""

    def __init__(self) -> None:
        self.pools: dict[str, PoolSlo] = {}

    def pool(self, name: str) -> PoolSlo:
        return self.pools.setdefault(name, PoolSlo())

    def observe_load(self, name: str, running: float, tokens_per_s: float, max_num_seqs: int | None) -> None:
        """A replica report: decode step = running sequences / tokens per second."""
        p = self.pool(name)
        if max_num_seqs:
            p.max_num_seqs = max_num_seqs
        if running >= 1 and tokens_per_s > 0:
            step = running / tokens_per_s
            p.decode_step_s = step if p.decode_step_s is None else p.decode_step_s + _EWMA * (step - p.decode_step_s)

    def decide(
        self, name: str, alias: str, slo_s: float, ready: int, inflight: int, prompt_tokens: float
    ) -> tuple[bool, SloTicket, dict[str, Any]]:
        """Spill on the SLO? Returns the decision, the ticket to settle, and the inputs (for the log)."""
        p = self.pool(name)
        gate = p.gates.get(alias)
        if gate is None or gate.slo_s != slo_s:
            gate = p.gates[alias] = SloGate(slo_s)
        p.predictor.set_rates(p.rates())
        n = max(1, ready)
        backlog = [ReplicaBacklog(inflight=round(inflight / n), prefill_tokens=p.pending_prompt_tokens / n)] * n
        raw = p.predictor.predict_raw(backlog, prompt_tokens) if ready else None
        predicted = None if raw is None else p.base_s + raw * p.predictor.correction
        spill = gate.update(predicted)
        per_replica = inflight / n
        no_queue = inflight == 0 or (p.max_num_seqs is not None and per_replica < p.max_num_seqs)
        ticket = SloTicket(name, prompt_tokens, raw, backlog_empty=inflight == 0, no_queue=no_queue)
        inputs = {
            "ttft_slo_ms": round(slo_s * 1000),
            "predicted_ttft_ms": None if predicted is None else round(predicted * 1000, 1),
            "correction": round(p.predictor.correction, 3),
            "base_ms": round(p.base_s * 1000, 1),
            "pending_prompt_tokens": round(p.pending_prompt_tokens),
        }
        return spill, ticket, inputs

    def sent(self, ticket: SloTicket) -> None:
        p = self.pool(ticket.pool)
        p.pending_prompt_tokens += ticket.prompt_tokens
        mean = p.mean_prompt_tokens
        p.mean_prompt_tokens = ticket.prompt_tokens if mean <= 0 else mean + _EWMA * (ticket.prompt_tokens - mean)

    def first_token(self, ticket: SloTicket, ttft_s: float | None) -> None:
        """The request got its first output (ttft) or left the prefill backlog without one (None)."""
        if not ticket.waiting:
            return
        ticket.waiting = False
        p = self.pool(ticket.pool)
        p.pending_prompt_tokens = max(0.0, p.pending_prompt_tokens - ticket.prompt_tokens)
        if ttft_s is None:
            return
        raw = ticket.predicted_raw
        if raw is None:
            return
        if not ticket.no_queue:
            if ttft_s > p.base_s:  # a TTFT under the overhead says nothing about the load part
                p.predictor.observe(raw, ttft_s - p.base_s)
            return
        # The fixed overhead: drops at once to a faster answer (a slow first request after deploy must
        # not inflate it for minutes), rises slowly.
        residual = max(0.0, ttft_s - raw)
        p.base_s = residual if residual < p.base_s else p.base_s + _EWMA * (residual - p.base_s)
        if not ticket.backlog_empty:
            return
        step = p.decode_step_s if p.decode_step_s is not None else _PRIOR_DECODE_STEP_S
        spent = ttft_s - p.base_s - step
        if ticket.prompt_tokens >= _LEARN_PREFILL_FROM_TOKENS and spent > 0:
            rate = ticket.prompt_tokens / spent
            old = p.prefill_tokens_per_s
            p.prefill_tokens_per_s = rate if old is None else old + _EWMA * (rate - old)

    def finished(self, name: str, completion_tokens: int) -> None:
        p = self.pool(name)
        if completion_tokens > 0:
            p.mean_output_tokens = (
                float(completion_tokens)
                if p.mean_output_tokens <= 0
                else p.mean_output_tokens + _EWMA * (completion_tokens - p.mean_output_tokens)
            )
