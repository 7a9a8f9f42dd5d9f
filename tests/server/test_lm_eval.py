"""lm-evaluation-harness against talan-serve equals lm-eval's own ``hf`` backend.

Tasks come from local files (a custom task YAML over local jsonl, no downloads). The
``hf`` side is the reference model object from ``talan_serve.reference`` (for a TALAN
checkpoint, the same call attaches the block), handed to lm-eval's HFLM.
"""

from __future__ import annotations

import pytest

from tests.server.support import (
    API_KEY,
    SERVED_NAME,
    evaluate,
    samples,
    start_server,
    write_tasks,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def server(model_dir, workdir):
    proc = start_server(model_dir, workdir)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def task_manager(workdir):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(write_tasks(workdir)))


@pytest.fixture(scope="module")
def hf_lm(model_dir):
    from lm_eval.models.huggingface import HFLM

    from talan_serve.reference import load_reference

    model, tokenizer = load_reference(str(model_dir))
    return HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=4,
                dtype="float32")


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # lm-eval's local-* models read it


def test_local_completions_equals_hf(server, model_dir, task_manager, hf_lm):
    tasks = ["tiny_mc", "tiny_gen"]
    served = evaluate(
        "local-completions", task_manager, tasks,
        model_args={"base_url": f"{server.base_url}/v1/completions", "model": SERVED_NAME,
                    "tokenizer": str(model_dir), "tokenizer_backend": "huggingface",
                    "tokenized_requests": True, "batch_size": 4, "max_retries": 1},
    )
    reference = evaluate(hf_lm, task_manager, tasks)
    assert served["results"]["tiny_mc"]["acc,none"] == reference["results"]["tiny_mc"]["acc,none"]
    assert served["results"]["tiny_gen"]["exact_match,none"] == \
        reference["results"]["tiny_gen"]["exact_match,none"]
    for ours, theirs in zip(samples(served, "tiny_mc"), samples(reference, "tiny_mc"),
                            strict=True):
        ours_ll = [r[0] for r in ours["filtered_resps"]]
        theirs_ll = [r[0] for r in theirs["filtered_resps"]]
        assert ours_ll == pytest.approx(theirs_ll, abs=1e-4)
        assert [r[1] for r in ours["filtered_resps"]] == [r[1] for r in theirs["filtered_resps"]]
    ours_text = [s["filtered_resps"] for s in samples(served, "tiny_gen")]
    assert ours_text == [s["filtered_resps"] for s in samples(reference, "tiny_gen")]
    assert any(text[0].strip() for text in ours_text)  # real generations, not empty strings


def test_local_chat_completions_equals_hf(server, task_manager, hf_lm):
    served = evaluate(
        "local-chat-completions", task_manager, ["tiny_gen"], apply_chat_template=True,
        model_args={"base_url": f"{server.base_url}/v1/chat/completions", "model": SERVED_NAME,
                    "max_retries": 1},
    )
    reference = evaluate(hf_lm, task_manager, ["tiny_gen"], apply_chat_template=True)
    ours = [s["filtered_resps"] for s in samples(served, "tiny_gen")]
    assert ours == [s["filtered_resps"] for s in samples(reference, "tiny_gen")]
    assert served["results"]["tiny_gen"]["exact_match,none"] == \
        reference["results"]["tiny_gen"]["exact_match,none"]
