"""Run one ``sglang.Engine`` over phases of requests and dump what it served.

    python tests/sglang/engine_worker.py job.json

A child process of the tests: SGLang kills its parent when a scheduler process fails.
job.json: {"model": dir, "engine": {kwargs}, "phases": [phase, ...], "out": path};
a phase: [request, ...], or {"load": [adapter, ...], "unload": [adapter, ...],
"requests": [request, ...]} on a server of many adapters, loaded and unloaded before its
requests (an adapter: {"id", "path", "lora": name or null, "lora_dir": dir or null});
a request: {"name", "input_ids", "talan": bool, "adapter": id or null, "lora": name or
null, "max_new": int, "input_logprobs": bool}. The requests of a phase go in one
``generate`` call (one scheduler batch, chunked as the engine decides); phases run one
after the other.
"""

from __future__ import annotations

import json
import sys
import time


def main(job_path: str) -> None:
    job = json.loads(open(job_path).read())
    import sglang

    from server.backends.sglang import MAX_RUNNING_REQUESTS, POOL_ENTRIES_PER_REQUEST
    from talan_serve.plugins.sglang.rows import hooks_applied
    from talan_serve.switch import switch_args

    started = time.time()
    # The state pool as talan-serve sizes it on a CPU: left to SGLang, it fills the free
    # memory (8 GB here, 10 s of each engine's start).
    running = MAX_RUNNING_REQUESTS["cpu"]
    kwargs = dict(model_path=job["model"], device="cpu", attention_backend="torch_native",
                  dtype="float32", max_total_tokens=4096, log_level="warning", random_seed=0,
                  max_running_requests=running,
                  max_mamba_cache_size=running * POOL_ENTRIES_PER_REQUEST)
    kwargs.update(job.get("engine", {}))
    engine = sglang.Engine(**kwargs)
    results = {"startup_s": round(time.time() - started, 1), "phases": [],
               "hooks_applied": hooks_applied()}
    for phase in job["phases"]:
        if isinstance(phase, dict):
            change_adapters(engine, phase)
            phase = phase["requests"]
        params = [{"temperature": 0.0, "max_new_tokens": r.get("max_new", 6), "ignore_eos": True,
                   "custom_params": switch_args(r.get("talan", True), r.get("adapter"))}
                  for r in phase]
        generate = dict(input_ids=[r["input_ids"] for r in phase], sampling_params=params,
                        return_logprob=True)
        if any(r.get("input_logprobs") for r in phase):
            generate["logprob_start_len"] = [0 if r.get("input_logprobs") else -1
                                             for r in phase]
        if any(r.get("lora") for r in phase):
            generate["lora_path"] = [r.get("lora") for r in phase]
        served = []
        for request, out in zip(phase, engine.generate(**generate), strict=True):
            meta = out["meta_info"]
            entry = {"name": request["name"], "output_ids": out["output_ids"],
                     "output_logprobs": [x[0] for x in meta["output_token_logprobs"]],
                     "cached_tokens": meta.get("cached_tokens")}
            if request.get("input_logprobs"):
                entry["input_logprobs"] = [x[0] for x in meta["input_token_logprobs"]]
            served.append(entry)
        results["phases"].append(served)
    engine.shutdown()
    with open(job["out"], "w") as handle:
        json.dump(results, handle)


def change_adapters(engine, phase: dict) -> None:
    """What the front end's SGLang backend does to load and unload adapters."""
    for adapter in phase.get("load", ()):
        engine.collective_rpc("talan_load_adapter", adapter=adapter["id"],
                              checkpoint_dir=adapter["path"])
        if adapter.get("lora"):
            result = engine.load_lora_adapter(adapter["lora"], adapter["lora_dir"])
            assert result.success, result.error_message
    for adapter in phase.get("unload", ()):
        engine.collective_rpc("talan_unload_adapter", adapter=adapter["id"])
        if adapter.get("lora"):
            assert engine.unload_lora_adapter(adapter["lora"]).success


if __name__ == "__main__":
    main(sys.argv[1])
