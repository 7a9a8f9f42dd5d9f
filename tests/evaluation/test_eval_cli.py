"""talan-eval against live servers on loopback: a tiny Qwen3 + TALAN + LoRA served with
``--deterministic``, and its LoRA-only twin (the same LoRA weights) on a second server.

Per-item files add up to lm-eval's own accuracy on each side; the TALAN-off side of the
switch run equals the twin's run item for item (generations equal, loglikelihoods within
fp32 parity); the comparison's counts agree with the item files; the plot is a PNG.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server.support import API_KEY, SERVED_NAME, start_server, write_tasks

pytestmark = pytest.mark.slow
TOL = 1e-4


@pytest.fixture(scope="module")
def servers(tiny_model, tmp_path_factory):
    from talan_serve.checkpoint import save_checkpoint
    from talan_serve.reference import load_reference
    from talan_serve.testing import build_tiny_checkpoint

    work = tmp_path_factory.mktemp("talan-eval")
    host = tiny_model("qwen3")
    checkpoint = build_tiny_checkpoint(host, work / "talan")
    # The twin: the TALAN checkpoint's own LoRA, without TALAN.
    reference = load_reference(host, talan=checkpoint)[0]
    twin = save_checkpoint(work / "twin", str(host), peft_model=reference)
    # Both at once: a start is mostly one process importing at a time.
    with ThreadPoolExecutor(2) as pool:
        starts = [pool.submit(start_server, host, work / f"s{index}", "--talan", str(folder),
                              "--deterministic")
                  for index, folder in enumerate((checkpoint, twin))]
    started = [start.result() for start in starts if start.exception() is None]
    try:
        talan_server, twin_server = (start.result() for start in starts)
        yield work, host, talan_server, twin_server
    finally:
        for server in started:
            server.stop()


def read_items(folder, task):
    return [json.loads(line) for line in (folder / f"{task}.jsonl").read_text().splitlines()]


def same_response(a, b) -> bool:
    """Generations equal; loglikelihoods ([logprob, is_greedy] per choice) within TOL."""
    if isinstance(a, list):
        return len(a) == len(b) and all(same_response(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return abs(a - b) <= TOL
    return a == b


def test_switch_run_against_twin_run(servers, monkeypatch):
    from evaluation.eval_cli import main

    work, host, talan_server, twin_server = servers
    monkeypatch.setenv("TALAN_SERVE_API_KEY", API_KEY)
    (work / "tasks").mkdir(exist_ok=True)
    tasks = write_tasks(work / "tasks")
    common = ["--model", SERVED_NAME, "--tasks", "tiny_mc", "tiny_gen", "--tokenizer", str(host),
              "--include-path", str(tasks),
              "--bootstrap-samples", "2000"]
    switch_run, twin_run = work / "switch", work / "twin-run"
    assert main(["run", "--base-url", talan_server.base_url, "--out", str(switch_run),
                 *common]) == 0
    assert main(["run", "--base-url", talan_server.base_url, "--twin", SERVED_NAME,
                 "--twin-base-url", twin_server.base_url, "--out", str(twin_run), *common]) == 0

    for run in (switch_run, twin_run):
        for side in ("talan", "baseline"):
            summary = json.loads((run / side / "summary.json").read_text())
            for task, entry in summary["tasks"].items():
                items = read_items(run / side, task)
                assert entry["agrees"] and len(items) == entry["items"]
                assert sum(i["score"] for i in items) / len(items) == \
                    pytest.approx(entry["lm_eval"], abs=1e-12)
        assert (run / "deltas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for task in ("tiny_mc", "tiny_gen"):
        off, twin = read_items(switch_run / "baseline", task), read_items(twin_run / "baseline",
                                                                          task)
        assert [i["correct"] for i in off] == [i["correct"] for i in twin]
        assert all(same_response(a["response"], b["response"]) for a, b in zip(off, twin,
                                                                                 strict=True))
    # TALAN on differs from off somewhere (the random TALAN is not a no-op).
    on = read_items(switch_run / "talan", "tiny_mc")
    assert any(not same_response(a["response"], b["response"])
               for a, b in zip(on, read_items(switch_run / "baseline", "tiny_mc"), strict=True))
    compared = json.loads((switch_run / "compare.json").read_text())
    for cell in compared["cells"]:
        talan_items = read_items(switch_run / "talan", cell["cell"])
        base_items = read_items(switch_run / "baseline", cell["cell"])
        pairs = list(zip(talan_items, base_items, strict=True))
        b = sum(t["correct"] and not s["correct"] for t, s in pairs)
        c = sum(s["correct"] and not t["correct"] for t, s in pairs)
        assert (cell["mcnemar"]["b"], cell["mcnemar"]["c"]) == (b, c)


def test_refusals_say_what_is_wrong(servers, capsys):
    from evaluation.eval_cli import main

    work, host, talan_server, _ = servers
    with pytest.raises(SystemExit, match="not 'nope'"):
        main(["run", "--base-url", talan_server.base_url, "--api-key", API_KEY, "--model",
              "nope", "--tasks", "tiny_gen", "--out", str(work / "x")])
    assert main(["run", "--base-url", talan_server.base_url, "--api-key", API_KEY, "--model",
                 SERVED_NAME, "--tasks", "gsm8k", "mbpp", "--out", str(work / "y")]) == 2
    err = capsys.readouterr().err
    assert "gsm8k_cot: its dataset openai/gsm8k is not in the local" in err
    assert "mbpp: its dataset google-research-datasets/mbpp" in err
