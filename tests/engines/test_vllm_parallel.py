"""vLLM's parallelism with TALAN, through ``talan-serve`` on loopback (CPU, fp32, greedy).

Tensor parallelism (TALAN replicated on both ranks), pipeline parallelism with TALAN's
layer on the first and on the second stage, and data parallelism each serve a tiny
Qwen3 + TALAN + LoRA checkpoint (LoRA merged, the default) with TALAN on and off: every
token id is the transformers reference's greedy choice and every logprob is within 1e-4
of the reference forward, as for the single-process engine (tests/engines/test_vllm.py).
The server binds the workers' threads itself (``server.cli.cpu_thread_binding``). vLLM's
Ray executor does not run on its CPU platform ("current platform cpu does not support
ray"), so the CLI refuses ``--distributed-executor-backend ray`` on CPU
(tests/server/test_cli.py).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytestmark = pytest.mark.slow

LOGPROB_TOL = 1e-4
MAX_TOKENS = 6
LENGTHS = [5, 40, 100]


def reference_answers(reference, prompts: list[list[int]]) -> dict:
    """Greedy ids and logprobs by full-sequence forwards, TALAN on and off."""
    from talan_serve.reference import talan_disabled

    answers = {}
    for talan in (True, False):
        for index, prompt in enumerate(prompts):
            ids, logprobs = [], []
            with torch.no_grad(), (contextlib.nullcontext() if talan
                                   else talan_disabled(reference)):
                for _ in range(MAX_TOKENS):
                    logits = reference(input_ids=torch.tensor([prompt + ids])).logits[0, -1]
                    logits = logits.float().log_softmax(-1)
                    ids.append(int(logits.argmax()))
                    logprobs.append(float(logits[ids[-1]]))
            answers[index, talan] = (ids, logprobs)
    return answers


def served_answers(server, prompts: list[list[int]]) -> dict:
    """The same requests, all in flight together (both replicas busy under DP)."""
    from talan_serve.switch import switch_args

    def one(key):
        index, talan = key
        body = {"model": "tiny", "prompt": prompts[index], "max_tokens": MAX_TOKENS,
                "temperature": 0, "logprobs": 0, "ignore_eos": True,
                "return_tokens_as_token_ids": True, **switch_args(talan)}
        with server.client() as client:
            response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return key, ([int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]],
                     choice["logprobs"]["token_logprobs"])

    keys = [(index, talan) for talan in (True, False) for index in range(len(prompts))]
    with ThreadPoolExecutor(len(keys)) as pool:
        return dict(pool.map(one, keys))


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory):
    """TALAN at layer_1 (stage 0 of 2) and at layer_3 (stage 1 of 2), each with its
    reference answers."""
    from talan_serve.reference import load_reference
    from talan_serve.testing import build_tiny_checkpoint

    host = tiny_model("qwen3")
    root = tmp_path_factory.mktemp("parallel")
    rng = random.Random(11)
    # Ids from 3 on: 0-2 are the tiny tokenizer's special tokens.
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in LENGTHS]
    built = {}
    for layer in ("layer_1", "layer_3"):
        checkpoint = build_tiny_checkpoint(host, root / layer, connection_point=layer)
        reference = load_reference(host, talan=checkpoint)[0]
        built[layer] = (checkpoint, reference_answers(reference, prompts))
    return root, prompts, built


@pytest.mark.parametrize(("layer", "flags"), [
    ("layer_1", ["--tensor-parallel-size", "2"]),
    ("layer_1", ["--pipeline-parallel-size", "2"]),
    ("layer_3", ["--pipeline-parallel-size", "2"]),
    ("layer_1", ["--data-parallel-size", "2"]),
], ids=["tp2", "pp2-talan-on-stage0", "pp2-talan-on-stage1", "dp2"])
def test_parallel_serving_matches_the_reference(checkpoints, layer, flags):
    from server.local import start_local_server

    root, prompts, built = checkpoints
    checkpoint, want = built[layer]
    if os.cpu_count() < 2:
        pytest.skip("two workers need two CPUs")
    workdir = root / "-".join([layer, *(f.strip("-") for f in flags)])
    server = start_local_server(checkpoint, workdir, *flags,
                                "--served-model-name", "tiny", "--dtype", "float32",
                                "--max-model-len", "256", "--log-level", "warning",
                                timeout=900)
    try:
        got = served_answers(server, prompts)
    finally:
        # uvicorn re-raises the SIGTERM it drained on: exit by that signal (or 0).
        assert server.stop() in (0, -signal.SIGTERM)
    for key, (ids, logprobs) in want.items():
        served_ids, served_logprobs = got[key]
        assert served_ids == ids, (key, served_ids, ids)
        assert max(abs(a - b) for a, b in zip(served_logprobs, logprobs, strict=True)) \
            <= LOGPROB_TOL, (key, served_logprobs, logprobs)
