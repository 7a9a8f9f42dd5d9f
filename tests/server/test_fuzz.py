"""Property-based fuzz of the live server from its own /openapi.json (schemathesis): valid
and invalid bodies for every endpoint, no 5xx, and the server healthy afterwards."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.server.support import API_KEY

pytestmark = pytest.mark.slow
# Generated bodies may ask for up to the whole context, n = 16 times over; the server's
# bounds are what the fuzz tests, not its throughput, so long generations are cut short.
# A body that gives no length gets one (each such example ran to the context: about 4 s).
MAX_GENERATED = 8
LENGTH_FIELD_OF = {"/v1/completions": "max_tokens",
                   "/v1/chat/completions": "max_completion_tokens",
                   "/v1/responses": "max_output_tokens"}
LENGTH_FIELDS = tuple(LENGTH_FIELD_OF.values())
EXAMPLES = 40  # per operation and generation mode


def _bounded(path: str, body):
    if isinstance(body, dict):
        for key in LENGTH_FIELDS:
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_GENERATED:
                body[key] = MAX_GENERATED
        if path in LENGTH_FIELD_OF and not any(key in body for key in LENGTH_FIELDS):
            body[LENGTH_FIELD_OF[path]] = MAX_GENERATED
    return body


def test_no_request_from_the_schema_is_a_server_error(server):
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize",
            "/detokenize"} <= paths
    headers = {"Authorization": f"Bearer {API_KEY}"}
    calls = []
    for operation in operations:
        # An operation without a body has nothing to get wrong (hypothesis: unsatisfiable).
        has_body = operation.method.upper() == "POST"
        modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE][: 2 if has_body else 1]
        for mode in modes:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                case.body = _bounded(case.operation.path, case.body)
                response = case.call(base_url=server.base_url, headers=headers, timeout=120)
                calls.append(response.status_code)
                case.validate_response(response, checks=[not_a_server_error])

            check()
    assert len(calls) >= len(operations) * EXAMPLES
    assert any(status == 200 for status in calls) and any(status == 400 for status in calls)


def test_healthy_after_the_fuzz(server):
    assert httpx.get(f"{server.base_url}/health", timeout=30).status_code == 200
    with server.client() as c:
        response = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 3})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
