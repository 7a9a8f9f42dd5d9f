"""One ``talan-serve --engine E`` process, one base model, several TALAN(+LoRA) adapters.

Started with two adapters (``--adapters``); a third is loaded at run time from an
allowlisted directory and unloaded again. Every adapter's greedy completion equals the
transformers reference of that checkpoint (ids and logprobs within 1e-4), the base model
equals the plain base model, and the OpenAI SDK works against it unchanged.
"""

from __future__ import annotations

import shutil

import openai
import pytest

from tests.contract.conftest import serve
from tests.contract.support import TOL, greedy
from tests.server.support import SERVED_NAME

pytestmark = pytest.mark.slow
PROMPT = "the water call first who"
STEPS = 6
ADAPTERS = {
    "alpha": dict(network_type="cross_attn", n_themes=2, connection_point="layer_1", seed=1),
    "beta": dict(network_type="per_token_mix", n_themes=4, connection_point="embedding",
                 seed=2, lora=False),
    "gamma": dict(network_type="gated_cross_attn", n_themes=3, connection_point="layer_1",
                  seed=3),
}


@pytest.fixture(scope="module")
def setup(tiny_model, workdir):
    from talan_serve.testing import build_tiny_checkpoint

    model_dir = tiny_model("qwen3")
    allowed = workdir / "allowed"
    paths = {name: build_tiny_checkpoint(model_dir, allowed / name, **options)
             for name, options in ADAPTERS.items()}
    outside = workdir / "outside" / "gamma"
    shutil.copytree(paths["gamma"], outside)
    return model_dir, paths, outside


@pytest.fixture(scope="module")
def server(engine, setup, workdir):
    model_dir, paths, _ = setup
    proc = serve(
        engine, model_dir, workdir, "--adapters", f"alpha={paths['alpha']}",
        f"beta={paths['beta']}",
        "--allowed-adapter-dirs", str(paths["gamma"].parent), "--max-lora-rank", "8",
        "--max-talan-slots", "4")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


@pytest.fixture(scope="module")
def references(setup):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from talan_serve.reference import load_reference

    model_dir, paths, _ = setup
    models = {name: load_reference(model_dir, talan=path)[0] for name, path in paths.items()}
    models[SERVED_NAME] = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    return models, AutoTokenizer.from_pretrained(model_dir)


def completion(client, model: str, talan: bool = True):
    response = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=STEPS, temperature=0, logprobs=0,
        extra_body={"ignore_eos": True, "talan": {"enabled": talan}})
    assert response.model == model
    return response.choices[0]


def reference_answer(references, model: str, talan: bool = True) -> tuple[str, list[float]]:
    models, tokenizer = references
    want_ids, want_lps = greedy(models[model], tokenizer(PROMPT).input_ids, STEPS,
                                talan and model != SERVED_NAME)
    return tokenizer.decode(want_ids, skip_special_tokens=True), want_lps


def assert_reference(client, references, model: str, talan: bool = True,
                     want: tuple[str, list[float]] | None = None) -> list[float]:
    text, logprobs = want or reference_answer(references, model, talan)
    choice = completion(client, model, talan)
    assert choice.text == text
    assert choice.logprobs.token_logprobs == pytest.approx(logprobs, abs=TOL)
    return choice.logprobs.token_logprobs


def model_ids(server) -> dict[str, dict]:
    with server.client() as c:
        return {card["id"]: card for card in c.get("/v1/models").json()["data"]}


def test_models_list_the_base_and_each_adapter(server, setup):
    _, paths, _ = setup
    cards = model_ids(server)
    assert set(cards) == {SERVED_NAME, "alpha", "beta"}
    assert cards[SERVED_NAME]["talan"] is False and cards[SERVED_NAME]["parent"] is None
    assert cards["alpha"]["parent"] == SERVED_NAME
    assert cards["alpha"]["root"] == str(paths["alpha"].resolve())
    assert (cards["alpha"]["adapter"], cards["beta"]["adapter"]) == ("per_request", None)


@pytest.mark.parametrize("model, talan", [("alpha", True), ("beta", True), ("alpha", False),
                                          (SERVED_NAME, True)])
def test_each_model_equals_its_reference(client, references, model, talan):
    assert_reference(client, references, model, talan)


def test_mixed_concurrent_requests_equal_their_references(client, references):
    from concurrent.futures import ThreadPoolExecutor

    jobs = [("alpha", True), ("beta", True), (SERVED_NAME, True), ("beta", False)] * 3
    # The references first: the switch of a shared HF model is not for concurrent use.
    wants = {job: reference_answer(references, *job) for job in set(jobs)}
    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(lambda job: assert_reference(client, references, *job, want=wants[job]),
                      jobs))


def test_load_serve_unload_at_run_time(server, client, references, setup):
    _, paths, outside = setup
    before = {name: assert_reference(client, references, name) for name in ("alpha", "beta")}
    with server.client() as c:
        # Refused: no key, outside the allowlist, a name in use, unknown fields.
        no_key = c.post("/v1/load_lora_adapter", headers={"Authorization": ""},
                        json={"lora_name": "gamma", "lora_path": str(paths["gamma"])})
        assert no_key.status_code == 401
        denied = c.post("/v1/load_lora_adapter",
                        json={"lora_name": "gamma", "lora_path": str(outside)})
        assert denied.status_code == 403
        assert denied.json()["error"]["code"] == "adapter_path_not_allowed"
        taken = c.post("/v1/load_lora_adapter",
                       json={"lora_name": "alpha", "lora_path": str(paths["gamma"])})
        assert taken.status_code == 400 and "loaded already" in taken.json()["error"]["message"]
        extra = c.post("/v1/load_lora_adapter", json={
            "lora_name": "gamma", "lora_path": str(paths["gamma"]), "load_inplace": True})
        assert extra.status_code == 400 and "load_inplace" in extra.json()["error"]["message"]
        assert "gamma" not in model_ids(server)

        loaded = c.post("/v1/load_lora_adapter",
                        json={"lora_name": "gamma", "lora_path": str(paths["gamma"])})
        assert loaded.status_code == 200, loaded.text
        assert model_ids(server)["gamma"]["parent"] == SERVED_NAME
    assert_reference(client, references, "gamma")
    assert_reference(client, references, "gamma", talan=False)

    with server.client() as c:
        gone = c.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"})
        assert gone.status_code == 200, gone.text
        again = c.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"})
        assert again.status_code == 404
    with pytest.raises(openai.NotFoundError) as error:
        completion(client, "gamma")
    assert error.value.body["code"] == "model_not_found"
    assert set(model_ids(server)) == {SERVED_NAME, "alpha", "beta"}
    for name, logprobs in before.items():
        assert completion(client, name).logprobs.token_logprobs == logprobs
