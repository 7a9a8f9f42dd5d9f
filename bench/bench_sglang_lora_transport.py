"""How a LoRA reaches SGLang's scheduler: its tensors serialized by SGLang's
``MultiprocessingSerializer`` (each storage into shared memory) in this process, and
deserialized in another, as the front end and the scheduler do for
``load_lora_adapter_from_tensors``; the demo checkpoint's LoRA (240 tensors), decoded by
safetensors (one storage per tensor) or by ``tensors_from_bytes`` (views of one buffer).
Medians of ``--repeats``, the two decodings alternating.

    .venv-sglang/bin/python bench/bench_sglang_lora_transport.py \\
        --out bench/results/sglang_lora_transport_cpu
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LORA = REPO / "checkpoints" / "smollm2-talan-demo" / "adapter_model.safetensors"


def receiver(conn) -> None:
    from sglang.srt.utils import MultiprocessingSerializer

    while (payload := conn.recv()) is not None:
        started = time.perf_counter()
        tensors = MultiprocessingSerializer.deserialize(payload)
        conn.send((time.perf_counter() - started, len(tensors)))
        del tensors


def main() -> None:
    from safetensors.torch import load
    from sglang.srt.utils import MultiprocessingSerializer

    from talan_serve.adapter_files import tensors_from_bytes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="bench/results/sglang_lora_transport_cpu")
    args = p.parse_args()
    data = LORA.read_bytes()
    decoders = {"safetensors (a storage per tensor)": lambda: load(data),
                "tensors_from_bytes (views of one buffer)": lambda: tensors_from_bytes(data)}
    times: dict[str, dict[str, list[float]]] = {
        name: {"decode": [], "serialize": [], "deserialize": []} for name in decoders}
    ours, theirs = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(target=receiver, args=(theirs,))
    process.start()
    for _ in range(args.repeats):
        for name, decode in decoders.items():
            started = time.perf_counter()
            tensors = decode()
            decoded = time.perf_counter()
            payload = MultiprocessingSerializer.serialize(tensors)
            serialized = time.perf_counter()
            ours.send(payload)
            took, count = ours.recv()
            times[name]["decode"].append(decoded - started)
            times[name]["serialize"].append(serialized - decoded)
            times[name]["deserialize"].append(took)
    ours.send(None)
    process.join()
    lines = ["# A LoRA's way to SGLang's scheduler", "",
             f"- {platform.machine()}, {multiprocessing.cpu_count()} CPUs; {count} tensors "
             f"({len(data) / 2**20:.1f} MiB); medians of {args.repeats}", "",
             "| decoded by | decode | serialize (front end) | deserialize (another process) |",
             "|---|---|---|---|"]
    for name, parts in times.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{1000 * statistics.median(parts[part]):.1f} ms"
            for part in ("decode", "serialize", "deserialize")) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
