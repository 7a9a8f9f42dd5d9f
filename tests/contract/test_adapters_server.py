"""One ``talan-serve --engine E`` process, one base model, many TALAN(+LoRA) adapters.

Started with two adapters (``--adapters``, pinned) and a directory of 10 more
(``--adapter-dir``, 3 places for them: ``--max-adapters 5``); a third adapter is loaded
at run time from an allowlisted directory and unloaded again. Every adapter's greedy
completion equals the transformers reference of that checkpoint (ids and logprobs within
1e-4), the base model equals the plain base model, and the OpenAI SDK works against it
unchanged. The directory's part (``test_adapter_dir_*``): requests cycle through all 10,
so each is evicted and loaded again (from the host cache the second time), a burst for
one adapter loads it once, and each hostile entry is refused with its reason.
"""

from __future__ import annotations

import re
import shutil
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack, suppress

import openai
import pytest

from tests.contract.conftest import serve
from tests.contract.library import (
    LIBRARY,
    LIBRARY_PLACES,
    LISTED_REFUSED,
    PINNED,
    REFUSED_FOLDERS,
    REFUSED_NAMES,
    build_library,
    library_references,
    reference_of,
)
from tests.contract.library import STEPS as LIBRARY_STEPS
from tests.contract.support import TOL, greedy
from tests.server.support import MAX_LEN, SERVED_NAME

pytestmark = pytest.mark.slow
PROMPT = "the water call first who"
STEPS = 6
QUEUE = 6  # --adapter-queue-size: the largest burst of the tests below fits it exactly
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
    build_library(workdir / "library", paths, outside)
    return model_dir, paths, outside


@pytest.fixture(scope="module")
def server(engine, setup, workdir):
    model_dir, paths, _ = setup
    proc = serve(
        engine, model_dir, workdir, "--adapters", f"alpha={paths['alpha']}",
        f"beta={paths['beta']}", "--adapter-dir", str(workdir / "library"),
        "--max-adapters", str(PINNED + LIBRARY_PLACES), "--allowed-adapter-dirs",
        str(paths["gamma"].parent), str(workdir / "library"), "--max-lora-rank", "8",
        "--max-talan-slots", "4", "--adapter-queue-size", str(QUEUE), "--log-level", "info")
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


def loaded_names(server) -> set[str]:
    return {name for name, card in model_ids(server).items() if card["loaded"]}


def test_models_list_the_base_and_each_adapter(server, setup):
    _, paths, _ = setup
    cards = model_ids(server)
    assert loaded_names(server) == {SERVED_NAME, "alpha", "beta"}
    assert cards["alpha"]["pinned"] is True and cards["beta"]["pinned"] is True
    assert cards[SERVED_NAME]["talan"] is False and cards[SERVED_NAME]["parent"] is None
    assert cards["alpha"]["parent"] == SERVED_NAME
    assert cards["alpha"]["root"] == str(paths["alpha"].resolve())
    assert (cards["alpha"]["adapter"], cards["beta"]["adapter"]) == ("per_request", None)


@pytest.mark.parametrize("model, talan", [("alpha", True), ("beta", True), ("alpha", False),
                                          (SERVED_NAME, True)])
def test_each_model_equals_its_reference(client, references, model, talan):
    assert_reference(client, references, model, talan)


def test_mixed_concurrent_requests_equal_their_references(client, references):
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
    assert "gamma" not in model_ids(server)
    assert loaded_names(server) == {SERVED_NAME, "alpha", "beta"}
    for name, logprobs in before.items():
        assert completion(client, name).logprobs.token_logprobs == logprobs


# --- --adapter-dir: more adapters than places, loaded on demand ---------------------------

@pytest.fixture(scope="module")
def library_wants(setup, workdir, references):
    _, tokenizer = references
    return library_references(setup[0], workdir / "library", tokenizer(PROMPT).input_ids)


def ask(server, model: str):
    with server.client() as client:
        return client.post("/v1/completions", json={
            "model": model, "prompt": PROMPT, "max_tokens": LIBRARY_STEPS, "temperature": 0,
            "logprobs": 0, "ignore_eos": True, "return_tokens_as_token_ids": True})


def assert_library_reference(server, wants, model: str) -> None:
    assert_library_answer(ask(server, model), wants, model)


def assert_library_answer(response, wants, model: str) -> None:
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    want_ids, want_lps = wants[model]
    assert [int(token.removeprefix("token_id:")) for token in logprobs["tokens"]] == want_ids
    assert logprobs["token_logprobs"] == pytest.approx(want_lps, abs=TOL)


def adapter_metrics(server) -> dict[str, float]:
    found = {source: server.metric("talan_serve_adapter_loads_total", f'source="{source}"')
             for source in ("disk", "cache")}
    found["evicted"] = server.metric("talan_serve_adapter_evictions_total")
    found["loaded"] = server.metric("talan_serve_adapters_loaded")
    for reason in ("name", "path", "checkpoint", "unfit"):
        found[reason] = server.metric("talan_serve_adapter_refused_total",
                                      f'reason="{reason}"')
    return found


def test_the_processes_the_server_starts_take_adapter_buffers_from_the_heap(server):
    """A CPU server raises glibc's mmap threshold before the engine starts, so that the
    engine's processes take each load's buffers from the heap, not from a new mapping
    each. Read in the processes' start-up environment: an engine that renames its
    processes may write over that record, so the value must be there in one of them and
    no other value in any."""
    import psutil

    from server.backends.template import ADAPTER_MMAP_THRESHOLD, has_gpu

    if has_gpu():
        pytest.skip("a CPU server's setting")
    seen = set()
    for child in psutil.Process(server.process.pid).children(recursive=True):
        with suppress(psutil.NoSuchProcess):  # a helper that has ended
            seen.add(child.environ().get("MALLOC_MMAP_THRESHOLD_"))
    assert str(ADAPTER_MMAP_THRESHOLD) in seen
    assert seen <= {str(ADAPTER_MMAP_THRESHOLD), None}


def test_adapter_dir_models_list_every_entry_with_whether_it_is_loaded(server):
    cards = model_ids(server)
    assert set(cards) == {SERVED_NAME, "alpha", "beta", *LIBRARY, *LISTED_REFUSED}
    assert loaded_names(server) == {SERVED_NAME, "alpha", "beta"}
    assert {cards[name]["pinned"] for name in LIBRARY} == {False}
    assert cards["a0"]["parent"] == SERVED_NAME and cards["a0"]["talan"] is True
    assert (cards["a0"]["adapter"], cards["a1"]["adapter"]) == ("per_request", None)


def test_adapter_dir_cycling_through_more_adapters_than_places(server, references,
                                                               library_wants):
    """Two rounds over the 10, 4 requests at a time on 3 places: each answer equals its
    reference; round one loads each from disk, round two each from the cache (it was
    evicted in between); the pinned adapters are never evicted."""
    client = server.openai()
    before = {name: assert_reference(client, references, name) for name in ("alpha", "beta")}
    start = adapter_metrics(server)
    for round_index, source in enumerate(("disk", "cache"), start=1):
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda name: assert_library_reference(server, library_wants, name),
                          LIBRARY))
        counts = {key: value - start.get(key, 0) for key, value in adapter_metrics(server).items()}
        assert counts[source] == len(LIBRARY), counts
        assert counts["disk"] + counts["cache"] == round_index * len(LIBRARY), counts
        assert counts["evicted"] == round_index * len(LIBRARY) - LIBRARY_PLACES, counts
        assert adapter_metrics(server)["loaded"] == PINNED + LIBRARY_PLACES
    assert len(loaded_names(server) & set(LIBRARY)) == LIBRARY_PLACES
    assert {"alpha", "beta"} <= loaded_names(server)
    # The server's own log, at its --log-level (SGLang's engine sets the process's root
    # logger for itself): each load with its source and time.
    logged = re.findall(r"adapter (\S+) loaded from (disk|cache) in [0-9.]+ s",
                        server.log.read_text())
    for source in ("disk", "cache"):
        assert {name for name, where in logged if where == source} >= set(LIBRARY), source
    for name, logprobs in before.items():
        assert completion(client, name).logprobs.token_logprobs == logprobs


def test_adapter_dir_burst_for_one_adapter_loads_it_once(server, library_wants):
    before = adapter_metrics(server)
    name = next(name for name in LIBRARY if name not in loaded_names(server))
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda _: assert_library_reference(server, library_wants, name),
                      range(6)))
    after = adapter_metrics(server)
    assert after["disk"] + after["cache"] == before["disk"] + before["cache"] + 1
    assert after["evicted"] == before["evicted"] + 1


def test_adapter_dir_wait_queue_past_its_bound_is_answered_429(server, library_wants):
    """Every directory place held by a request in flight: requests for one more adapter
    wait for a place, --adapter-queue-size of them; the others get 429 with Retry-After at
    once, and the waiting ones are served, each its reference, once the places free."""
    held = LIBRARY[:LIBRARY_PLACES]
    target = LIBRARY[LIBRARY_PLACES]
    burst = QUEUE + 4
    with server.client() as client, ExitStack() as streams:
        lines = []  # each stream's reader, kept: a reader let go closes its connection
        for name in held:  # in flight until closed: the server cannot evict them
            response = streams.enter_context(client.stream("POST", "/v1/completions", json={
                "model": name, "prompt": PROMPT, "max_tokens": MAX_LEN - 16,
                "ignore_eos": True, "stream": True}))
            assert response.status_code == 200
            lines.append(response.iter_lines())
            assert next(lines[-1]).startswith("data: {")
        with ThreadPoolExecutor(burst) as pool:
            asked = [pool.submit(ask, server, target) for _ in range(burst)]
            first = []  # while the places are held, only refusals can come back
            for future in as_completed(asked, timeout=60):
                first.append(future)
                if len(first) == burst - QUEUE:
                    break
            streams.close()  # the places free: the waiting requests load their adapter
            rest = [future.result(timeout=120) for future in asked if future not in first]
    for future in first:
        response = future.result()
        assert response.status_code == 429, response.text
        assert response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "adapter_queue_full"
    assert len(rest) == QUEUE
    for response in rest:
        assert_library_answer(response, library_wants, target)
    with server.client() as client:
        assert client.get("/health").status_code == 200


def test_adapter_dir_hostile_entries_are_refused_with_their_reason(server, library_wants,
                                                                   workdir):
    before = adapter_metrics(server)
    resident = loaded_names(server)
    asked = [(name, *answer) for name, answer in REFUSED_FOLDERS.items()] + [
        (name, 400, "invalid_adapter_name", "name", message)
        for name, message in REFUSED_NAMES.items()]
    for name, status, code, _, message in asked:
        for _ in range(2):  # the second answer comes from the refusal's memory
            response = ask(server, name)
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert message in error["message"], (name, error)
            assert (error["code"], error["param"]) == (code, "model"), (name, error)
    after = adapter_metrics(server)
    for reason in ("name", "path", "checkpoint", "unfit"):
        assert after[reason] - before[reason] == 2 * sum(r == reason for *_, r, _ in asked)
    for key in ("disk", "cache", "evicted", "loaded"):
        assert after[key] == before[key], key  # no place taken, nothing evicted
    assert loaded_names(server) == resident
    library = workdir / "library"
    with server.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        # The run-time load endpoint validates every checkpoint the same way.
        for folder, status, message in (("nan_lora", 400, "is not finite"),
                                        ("pickled", 400, "pickle files are refused"),
                                        ("inner_link", 403, "leads out of")):
            refused = c.post("/v1/load_lora_adapter",
                             json={"lora_name": "x", "lora_path": str(library / folder)})
            assert refused.status_code == status, refused.text
            assert message in refused.json()["error"]["message"]
    assert loaded_names(server) == resident
    for name in sorted(resident & set(LIBRARY)):  # the others keep serving
        assert_library_reference(server, library_wants, name)


def test_adapter_dir_a_changed_folder_serves_its_new_weights(server, setup, references,
                                                             library_wants, workdir):
    """An adapter evicted into the host cache, its folder then rewritten with other
    weights: its next load reads the folder again and answers as the new weights do (an
    engine that keeps an evicted adapter's LoRA, as SGLang's backend does, must not reuse
    the old one)."""
    from talan_serve.testing import reweight_checkpoint

    _, tokenizer = references
    library = workdir / "library"
    folder = library / "changing"  # a new entry, of the kind with a LoRA: the others stay
    reweight_checkpoint(setup[1]["alpha"], folder, seed=7)
    prompt = tokenizer(PROMPT).input_ids
    wants = {**library_wants, "changing": reference_of(setup[0], folder, prompt)}
    first = wants["changing"]
    assert_library_reference(server, wants, "changing")
    for name in LIBRARY[:LIBRARY_PLACES]:  # three others take the places: it is evicted
        assert_library_reference(server, wants, name)
    assert "changing" not in loaded_names(server)
    rewritten = workdir / "rewritten"
    reweight_checkpoint(setup[1]["alpha"], rewritten, seed=8)
    for file in rewritten.iterdir():
        shutil.copy(file, folder / file.name)
    wants["changing"] = reference_of(setup[0], folder, prompt)
    assert wants["changing"][1] != pytest.approx(first[1], abs=TOL)  # told apart
    before = adapter_metrics(server)
    assert_library_reference(server, wants, "changing")
    assert adapter_metrics(server)["disk"] == before["disk"] + 1
