"""64 streaming clients at once, over both front ends and mixed adapters, get the offline API's greedy outputs."""

import asyncio

import grpc
import openai
from serve_helpers import CONFIG

from jlora.engine.engine import EngineConfig
from jlora.generate import LLM
from jlora.sampling import SamplingParams
from jlora.serve.proto import jlora_pb2 as pb
from jlora.serve.proto import jlora_pb2_grpc as pb_grpc

N, MAX_TOKENS = 64, 12
ADAPTERS = [None, "alpha", "beta", "gamma"]


def _requests():
    return [([{"role": "user", "content": f"question {i}: {'why' if i % 3 else 'how'}?"}], ADAPTERS[i % 4])
            for i in range(N)]


async def _openai_stream(client, messages, adapter):
    stream = await client.chat.completions.create(model=adapter or "tiny", messages=messages, temperature=0,
                                                  max_tokens=MAX_TOKENS, stream=True)
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def _grpc_stream(stub, messages, adapter):
    req = pb.GenerateRequest(messages=[pb.ChatMessage(**m) for m in messages], adapter=adapter or "",
                             sampling=pb.SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    parts = [p async for p in stub.GenerateStream(req, timeout=120)]
    assert parts[-1].finished
    return "".join(p.text for p in parts), [t for p in parts for t in p.token_ids]


async def _all(served, requests):
    client = openai.AsyncOpenAI(base_url=served.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    async with grpc.aio.insecure_channel(served.grpc_target) as channel:
        stub = pb_grpc.JloraStub(channel)
        calls = [_openai_stream(client, m, a) if i % 2 else _grpc_stream(stub, m, a)
                 for i, (m, a) in enumerate(requests)]
        results = await asyncio.gather(*calls)
    await client.close()
    return results


def test_64_concurrent_streams_match_offline_generate(served):
    requests = _requests()
    results = asyncio.run(_all(served, requests))
    assert served.service.engine.stats()["finished"]  # the server ran them; now the offline API
    engine = served.service.engine.engine
    llm = LLM(served.model_dir, adapters=served.adapters, bank=engine.config.bank, max_model_len=CONFIG.max_position_embeddings,
              progress=False, engine=EngineConfig(max_num_seqs=N, num_pages=256))
    offline = llm.chat([m for m, _ in requests], adapter=[a for _, a in requests],
                       sampling=SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    for i, (result, ref) in enumerate(zip(results, offline)):
        if i % 2:
            assert result == ref.text, f"openai client {i} ({requests[i][1]})"
        else:
            assert result == (ref.text, ref.token_ids), f"gRPC client {i} ({requests[i][1]})"
    assert len({r.text for r in offline}) > 4  # adapters and prompts really differ
    served.wait_idle()
