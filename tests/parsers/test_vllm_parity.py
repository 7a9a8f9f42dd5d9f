"""Reasoning and tool calls split as vLLM's own OpenAI server splits them.

One tiny Qwen3-style model (Qwen3's think and tool-call tokens, Qwen3's chat template)
is served by vLLM's own OpenAI server with ``--reasoning-parser qwen3 --tool-call-parser
qwen3_coder``, then by talan-serve with ``--tool-call-parser qwen3_coder`` and the reasoning
parser that ``auto`` finds in the chat template (one server at a time: the cases run on
vLLM's first and its answers are kept). Each case's output is forced, by constrained decoding or
by the tokens it may use, so that the split shows reasoning and content (or a call); both
servers run it greedily, whole and streamed, and must give the same split. Two more of
the registry's tool-call parsers (``pythonic``, ``xlam``): vLLM's server's answer to a
forced call, recorded in ``tests/data/parsers`` (with the vLLM version it came from), must
be what talan-serve's parsing reads from the same tokens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.backends.vllm import cpu_thread_binding
from server.local import LocalServer, engine_env, start_on_free_port
from server.parsing import merge_tool_deltas
from talan_serve.testing import THINKING_HOST
from tests.server.support import MAX_LEN, SERVED_NAME, start_server

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CHOICE = {"type": "object", "properties": {"pick": {"type": "string", "enum": ["red", "blue"]}},
          "required": ["pick"], "additionalProperties": False}
QUESTION = [{"role": "user", "content": "the water home first"}]
# Qwen3-Coder's XML call (vLLM's qwen3_coder parser, beyond hermes and llama3_json).
CALL_TEXT = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
             "</function>\n</tool_call>")


def cases(tokenizer) -> dict[str, dict]:
    """Chat requests whose outputs are forced (greedy, and by tokens or a grammar)."""
    think_end = tokenizer.convert_tokens_to_ids("</think>")
    (word,) = tokenizer.encode(" call", add_special_tokens=False)
    end_first = {str(think_end): 100}  # the reasoning ends at once; the grammar follows
    return {
        # Reasoning, then </think>, then content: two tokens allowed, and a bias that
        # makes this model's greedy choice alternate between them (its second token ends
        # the reasoning; the later </think> tokens are dropped, as vLLM's parser does).
        "split": dict(max_tokens=16, allowed_token_ids=[word, think_end],
                      logit_bias={str(think_end): -2}),
        # Cut short inside the reasoning: all of it is reasoning.
        "reasoning_only": dict(max_tokens=8),
        # enable_thinking false: the template closes the reasoning, the grammar starts at once.
        "thinking_off": dict(max_tokens=24, chat_template_kwargs={"enable_thinking": False},
                             response_format={"type": "json_schema", "json_schema": {
                                 "name": "pick", "schema": CHOICE}}),
        # The JSON schema applies to the content after the reasoning.
        "schema_after_reasoning": dict(max_tokens=24, logit_bias=end_first,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "pick", "schema": CHOICE}}),
        # A call, forced by a regular expression (the text has no character that is
        # special in one) from the first token: thinking off.
        "tool_call": dict(max_tokens=80, chat_template_kwargs={"enable_thinking": False},
                          tools=[WEATHER], tool_choice="auto",
                          structured_outputs={"regex": CALL_TEXT}),
    }


def whole(client: httpx.Client, request: dict) -> dict:
    response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    message = choice["message"]
    return {"reasoning": message.get("reasoning_content") or message.get("reasoning"),
            "content": message["content"], "finish_reason": choice["finish_reason"],
            "tool_calls": [(c["function"]["name"], c["function"]["arguments"])
                           for c in message.get("tool_calls") or []]}


def streamed(client: httpx.Client, request: dict) -> dict:
    reasoning, content, calls, finish = [], [], [], None
    with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                delta = choice["delta"]
                reasoning.append(delta.get("reasoning_content") or delta.get("reasoning") or "")
                content.append(delta.get("content") or "")
                calls += delta.get("tool_calls") or []
                finish = choice["finish_reason"] or finish
    return {"reasoning": "".join(reasoning) or None, "content": "".join(content) or None,
            "finish_reason": finish,
            "tool_calls": [(c["function"]["name"], c["function"]["arguments"])
                           for c in merge_tool_deltas(calls)]}


def answers(base_url: str, requests: dict[str, dict], headers: dict | None = None) -> dict:
    out = {}
    with httpx.Client(base_url=base_url, timeout=120, headers=headers or {}) as client:
        for name, fields in requests.items():
            request = {"model": SERVED_NAME, "messages": QUESTION, "temperature": 0, **fields}
            out[name] = {"whole": whole(client, request), "streamed": streamed(client, request)}
    return out


def start_vllm(model: Path, workdir: Path, tool_parser: str = "qwen3_coder",
               reasoning_parser: str | None = "qwen3") -> LocalServer:
    """vLLM's own OpenAI server with the engine settings of talan-serve --deterministic."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", SERVED_NAME, "--dtype", "float32",
               "--max-model-len", str(MAX_LEN), "--enforce-eager", "--seed", "0",
               "--max-num-seqs", "1", "--no-enable-prefix-caching",
               "--structured-outputs-config.backend", "xgrammar",
               "--structured-outputs-config.disable_any_whitespace", "true",
               *(["--reasoning-parser", reasoning_parser] if reasoning_parser else []),
               "--enable-auto-tool-choice", "--tool-call-parser", tool_parser]
    env = engine_env(workdir)
    # The CPU threads talan-serve gives its engine (vLLM's own default binds one core).
    binding = cpu_thread_binding(sorted(os.sched_getaffinity(0)), 1)
    if binding is not None:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", binding)
    # Its own process group: stopping it stops its engine process too. A busy machine
    # slows its start.
    return start_on_free_port(lambda port: [*command, "--port", str(port)], workdir, env,
                              timeout=600, log_name="vllm", new_session=True)


def stop_group(server: LocalServer) -> None:
    """The server and every process it started (its engine's may leave its group)."""
    import psutil

    try:
        children = psutil.Process(server.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
    _, alive = psutil.wait_procs(children, timeout=30)
    for child in alive:
        child.kill()


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model(THINKING_HOST)


@pytest.fixture(scope="module")
def requests(model) -> dict[str, dict]:
    from transformers import AutoTokenizer

    return cases(AutoTokenizer.from_pretrained(model))


@pytest.fixture(scope="module")
def vllm_answers(model, requests, tmp_path_factory) -> dict:
    server = start_vllm(model, tmp_path_factory.mktemp("vllm-serve"))
    try:
        return answers(server.base_url, requests)
    finally:
        stop_group(server)


@pytest.fixture(scope="module")
def talan(model, vllm_answers, tmp_path_factory):
    # After vLLM's server stopped: one engine at a time.
    server = start_server(model, tmp_path_factory.mktemp("talan-serve"), "--deterministic",
                          "--tool-call-parser", "qwen3_coder")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def talan_answers(talan, requests) -> dict:
    return answers(talan.base_url, requests,
                   {"Authorization": f"Bearer {talan.api_key}"})


def test_responses_reasoning_item(talan, requests, vllm_answers):
    """The Responses API gives a reasoning model's reasoning as a reasoning item."""
    expected = vllm_answers["reasoning_only"]["whole"]["reasoning"]
    client = talan.openai()
    kwargs = dict(model=SERVED_NAME, input=QUESTION, temperature=0, max_output_tokens=8)
    response = client.responses.create(**kwargs)
    (item,) = response.output
    assert item.type == "reasoning" and item.content[0].text == expected
    assert response.usage.output_tokens_details.reasoning_tokens == 8
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") \
        == expected
    assert events[-1].type == "response.completed"


@pytest.mark.parametrize("case", ["split", "reasoning_only", "thinking_off",
                                  "schema_after_reasoning", "tool_call"])
def test_split_equals_vllm(case, vllm_answers, talan_answers):
    theirs, ours = vllm_answers[case], talan_answers[case]
    assert ours == theirs
    # The cases do what they are for (on both servers, as they are equal).
    got = ours["whole"]
    if case == "split":
        assert got["reasoning"] and got["content"]
    elif case == "reasoning_only":
        assert got["reasoning"] and got["content"] is None and got["finish_reason"] == "length"
    elif case == "thinking_off":
        assert got["reasoning"] is None and json.loads(got["content"])["pick"] in ("red", "blue")
    elif case == "schema_after_reasoning":
        assert json.loads(got["content"])["pick"] in ("red", "blue")
    else:
        ((name, arguments),) = got["tool_calls"]
        assert (name, json.loads(arguments)) == ("get_weather", {"city": "Paris"})
        # Cut at its length after the call: a whole answer says tool_calls, a stream
        # only after a stop (vLLM's rule).
        assert (got["finish_reason"], ours["streamed"]["finish_reason"]) == \
            ("tool_calls", "length")
        # vLLM's qwen3_coder parser streams the call's opening line as content (and so,
        # being equal to it, does talan-serve); the whole answer has none.
        assert ours["streamed"]["content"] == "<tool_call>\n" and got["content"] is None
    # Streamed deltas assemble into the whole answer.
    same = ("reasoning", "tool_calls") if case == "tool_call" else \
        ("reasoning", "content", "tool_calls")
    assert {k: ours["streamed"][k] for k in same} == {k: got[k] for k in same}


# ---- more of the registry's tool-call parsers: vLLM's server against the same parsing in
# talan-serve (``server.outputs.OutputReader`` over ``VllmParsers``) on the same tokens ------

FORCED_CALLS = {
    "pythonic": "[get_weather(city='Paris')]",
    "xlam": '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
}


# vLLM's server answers for these are recorded in the repository (two more server starts
# otherwise); TALAN_RECORD_VLLM_PARITY=1 records them again, which a new vLLM requires.
RECORDED = Path(__file__).parent.parent / "data" / "parsers" / "vllm_tool_calls.json"


def forced_call_request(parser: str) -> dict:
    import re

    return {"model": SERVED_NAME, "messages": QUESTION, "temperature": 0, "max_tokens": 60,
            "tools": [WEATHER], "tool_choice": "auto", "return_token_ids": True,
            "chat_template_kwargs": {"enable_thinking": False},
            "structured_outputs": {"regex": re.escape(FORCED_CALLS[parser])}}


def record_forced_calls(model: Path, workdir: Path) -> dict:
    import vllm

    recorded = {"vllm": vllm.__version__, "calls": {}}
    for parser in sorted(FORCED_CALLS):
        server = start_vllm(model, workdir / f"vllm-{parser}", tool_parser=parser,
                            reasoning_parser=None)
        body = forced_call_request(parser)
        try:
            with httpx.Client(base_url=server.base_url, timeout=120) as client:
                response = client.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                recorded["calls"][parser] = {"response": response.json(),
                                             "streamed": streamed(client, body)}
        finally:
            stop_group(server)
    RECORDED.parent.mkdir(parents=True, exist_ok=True)
    RECORDED.write_text(json.dumps(recorded, indent=1) + "\n")
    return recorded


@pytest.fixture(scope="module")
def recorded_calls(model, tmp_path_factory) -> dict:
    if os.environ.get("TALAN_RECORD_VLLM_PARITY") == "1":
        return record_forced_calls(model, tmp_path_factory.mktemp("vllm-calls"))["calls"]
    import vllm

    recorded = json.loads(RECORDED.read_text())
    assert recorded["vllm"] == vllm.__version__, (
        f"{RECORDED.name} was recorded with vLLM {recorded['vllm']}, this is "
        f"{vllm.__version__}: record it again with TALAN_RECORD_VLLM_PARITY=1")
    return recorded["calls"]


@pytest.fixture(params=sorted(FORCED_CALLS))
def vllm_call(request, recorded_calls):
    """``(parser, request, vLLM's chat response, its streamed split)`` for a forced call."""
    parser = request.param
    call = recorded_calls[parser]
    streamed_split = {**call["streamed"],
                      "tool_calls": [tuple(c) for c in call["streamed"]["tool_calls"]]}
    return parser, forced_call_request(parser), call["response"], streamed_split


def test_more_tool_parsers_equal_vllm(vllm_call, model):
    from transformers import AutoTokenizer

    from server.backends.vllm_parsers import VllmParsers
    from server.outputs import OutputReader
    from server.parsing import ParseRequest
    from server.prompts import template_kwargs
    from server.schemas import ChatCompletionRequest
    from server.tools import plan_tools

    parser, body, theirs, theirs_streamed = vllm_call
    tokenizer = AutoTokenizer.from_pretrained(model)
    chat = ChatCompletionRequest.model_validate(
        {k: v for k, v in body.items() if k not in ("return_token_ids",)})
    plan = plan_tools(chat, parser)
    choice = theirs["choices"][0]
    ids = choice["token_ids"]
    request = ParseRequest(None, parser, plan.tools, QUESTION, template_kwargs(chat),
                           theirs["prompt_token_ids"], auto_tools=True)

    def reader() -> OutputReader:
        return OutputReader(VllmParsers().make(request, tokenizer), plan, None, True)

    # The text as the engine detokenizes it for this server (the parsers' choice).
    skip = VllmParsers().make(request, tokenizer).skip_special_tokens() is not False

    def decode(upto: int) -> str:
        return tokenizer.decode(ids[:upto], skip_special_tokens=skip)

    text = decode(len(ids))

    ours = reader().whole(text, ids)
    message = choice["message"]
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
             for c in message["tool_calls"]]
    assert calls == [("get_weather", {"city": "Paris"})]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in ours.tool_calls] == calls
    assert ours.content == message["content"]
    # Streamed one token at a time, as vLLM's server streams it.
    stream, deltas, sent = reader(), [], ""
    for i in range(len(ids)):
        now = decode(i + 1)
        parsed = stream.delta(now[len(sent):], ids[i:i + 1], i + 1 == len(ids))
        sent = now
        deltas += parsed.tool_calls if parsed is not None else []
    assert [(c["function"]["name"], c["function"]["arguments"])
            for c in merge_tool_deltas(deltas)] == theirs_streamed["tool_calls"]
