"""A reasoning model on every engine: the engine's own reasoning parser, found from the
chat template (``auto``), splits ``reasoning_content`` from ``content``, whole and streamed,
in chat and in the Responses API; ``enable_thinking: false`` turns it off and a JSON schema
then applies from the first token. (``tests/parsers/`` holds the split against vLLM's own
server.)"""

from __future__ import annotations

import json

import pytest

from talan_serve.testing import THINKING_HOST
from tests.contract.conftest import serve
from tests.server.support import SERVED_NAME

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "the water home first"}]
CHOICE = {"type": "object", "properties": {"pick": {"type": "string", "enum": ["red", "blue"]}},
          "required": ["pick"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(engine, tiny_model, workdir):
    server = serve(engine, tiny_model(THINKING_HOST), workdir, "--deterministic")
    yield server.openai()
    server.stop()


def split(client, stream: bool, **extra) -> tuple[str | None, str | None]:
    kwargs = dict(model=SERVED_NAME, messages=QUESTION, temperature=0, **extra)
    if not stream:
        message = client.chat.completions.create(**kwargs).choices[0].message
        return message.model_extra.get("reasoning_content"), message.content
    reasoning, content = [], []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
            content.append(choice.delta.content or "")
    return "".join(reasoning) or None, "".join(content) or None


def test_cut_short_in_the_reasoning(client):
    whole = split(client, False, max_tokens=8)
    assert whole[0] and whole[1] is None
    assert split(client, True, max_tokens=8) == whole
    response = client.responses.create(model=SERVED_NAME, input=QUESTION, temperature=0,
                                       max_output_tokens=8)
    (item,) = response.output
    assert item.type == "reasoning" and item.content[0].text == whole[0]


def test_thinking_off_and_a_schema(client):
    extra = dict(max_tokens=24, extra_body={"chat_template_kwargs": {"enable_thinking": False}},
                 response_format={"type": "json_schema",
                                  "json_schema": {"name": "pick", "schema": CHOICE}})
    reasoning, content = split(client, False, **extra)
    assert reasoning is None and json.loads(content)["pick"] in ("red", "blue")
    assert split(client, True, **extra) == (reasoning, content)
