"""Run one ``sglang.Engine`` over phases of requests and dump what it served.

    python tests/sglang/engine_worker.py job.json

A child process of the tests: SGLang kills its parent when a scheduler process fails.
job.json: {"model": dir, "engine": {kwargs}, "phases": [[request, ...], ...], "out": path};
a request: {"name", "input_ids", "talan": bool, "lora": name or null, "max_new": int,
"input_logprobs": bool}. The requests of a phase go in one ``generate`` call (one
scheduler batch, chunked as the engine decides); phases run one after the other.
"""

from __future__ import annotations

import json
import sys
import time


def main(job_path: str) -> None:
    job = json.loads(open(job_path).read())
    import sglang

    from talan_serve.plugins.sglang.switch import hooks_applied
    from talan_serve.switch import switch_args

    started = time.time()
    kwargs = dict(model_path=job["model"], device="cpu", attention_backend="torch_native",
                  dtype="float32", max_total_tokens=4096, log_level="warning", random_seed=0)
    kwargs.update(job.get("engine", {}))
    engine = sglang.Engine(**kwargs)
    results = {"startup_s": round(time.time() - started, 1), "phases": [],
               "hooks_applied": hooks_applied()}
    for phase in job["phases"]:
        params = [{"temperature": 0.0, "max_new_tokens": r.get("max_new", 6), "ignore_eos": True,
                   "custom_params": switch_args(r.get("talan", True))} for r in phase]
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


if __name__ == "__main__":
    main(sys.argv[1])
