"""A TALAN(+LoRA) checkpoint served by talan-serve equals the transformers reference.

The server runs the TALAN vLLM plugin (``--talan CKPT``) the default way, with the LoRA
merged into the weights at load, and once more with it served per request
(``--no-merge-lora``); the reference is ``talan_serve.reference.load_reference`` (HF + PEFT
+ TALAN, full-sequence forward, fp32). Also: the per-request off switch equals the
reference under ``talan_disabled``, and lm-eval's loglikelihood through the server equals
its ``hf`` backend on the reference.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.server.support import API_KEY, SERVED_NAME, evaluate, samples, start_server, write_tasks

pytestmark = pytest.mark.slow
TOL = 1e-4
PROMPTS = ["the water call first who", "Solve 12 plus 7 equals", "a"]


@pytest.fixture(scope="module")
def checkpoint(tiny_model, workdir):
    from talan_serve.testing import build_tiny_checkpoint

    model_dir = tiny_model("qwen3")
    return model_dir, build_tiny_checkpoint(model_dir, workdir / "checkpoint")


@pytest.fixture(scope="module")
def server(checkpoint, workdir):
    model_dir, ckpt = checkpoint
    proc = start_server(model_dir, workdir, "--talan", str(ckpt), "--deterministic")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def unmerged_client(checkpoint, workdir):
    model_dir, ckpt = checkpoint
    proc = start_server(model_dir, workdir, "--talan", str(ckpt), "--no-merge-lora")
    with proc.client() as c:
        assert c.get("/v1/models").json()["data"][0]["adapter"] == "per_request"
    yield proc.openai()
    proc.stop()


@pytest.fixture(scope="module")
def reference(checkpoint):
    from talan_serve.reference import load_reference

    model_dir, ckpt = checkpoint
    return load_reference(model_dir, talan=ckpt)


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def greedy(model, ids: list[int], steps: int, talan: bool) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs by full-sequence forwards (the spec's reference)."""
    from talan_serve.reference import talan_disabled

    out_ids, out_lps = [], []
    context = contextlib.nullcontext() if talan else talan_disabled(model)
    with torch.no_grad(), context:
        for _ in range(steps):
            logprobs = model(input_ids=torch.tensor([ids + out_ids])).logits[0, -1]
            logprobs = logprobs.float().log_softmax(-1)
            token = int(logprobs.argmax())
            out_ids.append(token)
            out_lps.append(float(logprobs[token]))
    return out_ids, out_lps


def test_models_say_what_is_served(server):
    with server.client() as c:
        (card,) = c.get("/v1/models").json()["data"]
    assert (card["talan"], card["adapter"], card["dtype"], card["deterministic"]) == \
        (True, "merged", "float32", True)


@pytest.mark.parametrize("talan", [True, False])
def test_greedy_completion_equals_reference(client, reference, talan):
    assert_greedy_equals_reference(client, reference, talan)


@pytest.mark.parametrize("talan", [True, False])
def test_lora_served_per_request_equals_reference(unmerged_client, reference, talan):
    assert_greedy_equals_reference(unmerged_client, reference, talan)


def assert_greedy_equals_reference(client, reference, talan: bool) -> None:
    model, tokenizer = reference
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        want_ids, want_lps = greedy(model, ids, 8, talan)
        response = client.completions.create(
            model=SERVED_NAME, prompt=ids, max_tokens=8, temperature=0, logprobs=0,
            extra_body={"ignore_eos": True, "talan": {"enabled": talan}})
        got = response.choices[0].logprobs
        # Same tokens: the same text (a full decode, see server/backends/vllm.py) and the
        # same logprob at every step (a different token would not match within TOL).
        assert response.choices[0].text == tokenizer.decode(want_ids, skip_special_tokens=True)
        assert len(got.tokens) == len(want_ids)
        assert got.token_logprobs == pytest.approx(want_lps, abs=TOL)


def test_switch_changes_the_output(client):
    def run(enabled: bool) -> list[float]:
        response = client.completions.create(
            model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=0,
            extra_body={"ignore_eos": True, "talan": {"enabled": enabled}})
        return response.choices[0].logprobs.token_logprobs

    on, off = run(True), run(False)
    assert max(abs(a - b) for a, b in zip(on, off, strict=True)) > 1e-3


def test_echo_logprobs_equal_reference_forward(client, reference):
    model, tokenizer = reference
    ids = tokenizer(PROMPTS[1]).input_ids
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    want = [float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    response = client.completions.create(model=SERVED_NAME, prompt=ids, echo=True, max_tokens=0,
                                         logprobs=1, temperature=0)
    assert response.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=TOL)


def test_lm_eval_loglikelihood_equals_hf_on_reference(server, checkpoint, reference, workdir,
                                                      monkeypatch):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    model_dir, _ = checkpoint
    tasks_dir = workdir / "tasks"
    tasks_dir.mkdir(exist_ok=True)
    manager = TaskManager(include_path=str(write_tasks(tasks_dir)))
    served = evaluate(
        "local-completions", manager, ["tiny_mc"],
        model_args={"base_url": f"{server.base_url}/v1/completions", "model": SERVED_NAME,
                    "tokenizer": str(model_dir), "tokenizer_backend": "huggingface",
                    "batch_size": 4, "max_retries": 1},
    )
    model, tokenizer = reference
    hf = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=4)
    expected = evaluate(hf, manager, ["tiny_mc"])
    for ours, theirs in zip(samples(served, "tiny_mc"), samples(expected, "tiny_mc"),
                            strict=True):
        assert [r[0] for r in ours["filtered_resps"]] == \
            pytest.approx([r[0] for r in theirs["filtered_resps"]], abs=TOL)
    assert served["results"]["tiny_mc"]["acc,none"] == expected["results"]["tiny_mc"]["acc,none"]
