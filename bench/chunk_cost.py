"""Micro-benchmark: the replica-side CPU cost per stream chunk in our code (issue 13).

Times `StreamAccounting.chunk` (reads vLLM's SSE text: tokens per chunk, the final usage) and the alias
rewrite of `LLMServer` over chunk strings rendered the way vLLM 0.32's serving layer renders them
(`model_dump_json(exclude_unset=True)`, one event per piece). Pure Python, no engine:

    .venv/bin/python -m bench.chunk_cost

Measured here (2-core Xeon, quiet, best of 5; before = json.loads of every event and a per-chunk formatted
alias pattern): StreamAccounting.chunk 4.4-4.6 -> 1.4 us per chunk; alias rewrite 0.28 -> 0.17 us per chunk
when the alias differs from the engine's name, ~0 when equal (as before: the identity).
"""

from __future__ import annotations

import timeit

from serve_app.engines.vllm_support import StreamAccounting
from serve_app.protocol import ChunkReply

_HEAD = '{"id":"chatcmpl-8f1c2b7e9a4d4c1f","object":"chat.completion.chunk","created":1764583200,"model":"smollm2",'
ROLE = (
    f'data: {_HEAD}"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},'
    '"logprobs":null,"finish_reason":null}]}\n\n'
)
TOKEN = (
    f'data: {_HEAD}"choices":[{{"index":0,"delta":{{"content":" Paris"}},"logprobs":null,'
    '"finish_reason":null,"stop_reason":null,"token_ids":null}]}\n\n'
)
FINISH = (
    f'data: {_HEAD}"choices":[{{"index":0,"delta":{{"content":""}},"logprobs":null,'
    '"finish_reason":"stop","stop_reason":null,"token_ids":null}]}\n\n'
)
USAGE = f'data: {_HEAD}"choices":[],"usage":{{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2}}}}\n\n'
COMPLETION = (
    'data: {"id":"cmpl-8f1c2b7e9a4d4c1f","created":1764583200,"model":"smollm2","choices":[{"index":0,'
    '"text":" Paris","logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
)
DONE = "data: [DONE]\n\n"

# A 64-token chat stream: role chunk, 63 content chunks, the finish chunk, usage, [DONE].
STREAM = [ROLE, *[TOKEN] * 63, FINISH, USAGE, DONE]


def per_chunk_us(fn: object, number: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=5))  # type: ignore[arg-type]
    return best / number * 1e6


def accounting_stream() -> None:
    acc = StreamAccounting(False)
    for i, text in enumerate(STREAM):
        acc.chunk(text, i + 1)


def main() -> None:
    n = 2000
    print(
        f"StreamAccounting.chunk, 64-token chat stream: {per_chunk_us(accounting_stream, n) / len(STREAM):.2f} us/chunk"
    )
    for label, piece in (("one content chunk:  ", TOKEN), ("completions chunk:  ", COMPLETION)):
        acc = StreamAccounting(False)
        counter = iter(range(1, 10**9))
        cost = per_chunk_us(lambda: acc.chunk(piece, next(counter)), n * 50)  # noqa: B023 (used at once)
        print(f"StreamAccounting.chunk, {label} {cost:.2f} us")
    from serve_app.llm_server import realiaser

    same, other = realiaser("smollm2", "smollm2"), realiaser("smollm2", "my-alias")

    def rewrite_same() -> None:
        same(ChunkReply(TOKEN, 1))

    def rewrite_other() -> None:
        other(ChunkReply(TOKEN, 1))

    base = per_chunk_us(lambda: ChunkReply(TOKEN, 1), n * 50)  # the ChunkReply construction both include
    print(f"alias rewrite, alias == served name:         {per_chunk_us(rewrite_same, n * 50) - base:.2f} us")
    print(f"alias rewrite, alias != served name:         {per_chunk_us(rewrite_other, n * 50) - base:.2f} us")


if __name__ == "__main__":
    main()
