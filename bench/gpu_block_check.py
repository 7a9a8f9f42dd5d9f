"""GPU checks of the TALAN block alone (torch only: runs where vLLM's CUDA build is absent).

``bench/run_gpu_checks.sh`` runs this first, then ``gpu_check.py`` when vLLM is there.

1. ``parity``: the block on CUDA equals the block on CPU (fp32, 1e-5) for a packed batch
   of mixed-length sequences and for the same tokens fed one decode step at a time; with a
   bf16 residual stream (fp32 block, as the engines run it) the perturbation stays within
   bf16 rounding of the fp32 one.
2. ``cuda_graph``: the vLLM layer's decode step, the very code it runs (its metadata made
   into a ``StepBatch`` by ``talan_serve.plugins.vllm.batch``, then
   ``talan_serve.engine.side_path.SidePath.step``: state indices, resume flags, per-row
   on/off), captured once in a CUDA graph and replayed 32 steps on new inputs: every
   replay equals the eager (planned) step, each TALAN-on row's state mass grows by
   exactly 1 per step and TALAN-off rows stay put.
3. ``sglang_step``: the SGLang layer's decode step (``talan_serve.plugins.sglang.layer.
   step_batch``, then ``SidePath.step``) for a batch padded the way SGLang's CUDA-graph
   runner pads it (rows with state index -1), captured and replayed 16 steps against
   eager: outputs equal, real rows' states advance (TALAN-on) or stay (TALAN-off), and
   padding touches only the pool's scratch entry 0.
4. ``timing``: at Qwen3-8B shape with the q8b preset (bf16 stream), the decode step's time
   per call eager vs graph-replayed, batch 1/8/32, next to the time of the bf16 weight
   GEMMs of one Qwen3-8B decode step at the same batch (a stand-in, and a lower bound, for
   the model step: no attention, norms or vLLM; the engine figure is gpu_check.py's).

    python bench/gpu_block_check.py --out bench/results/gpu_h200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from talan_serve.block import TalanBlock, empty_state  # noqa: E402
from talan_serve.presets import preset  # noqa: E402
from talan_serve.testing import tiny_talan_config  # noqa: E402


def log(message: str) -> None:
    print(f"[gpu_block_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def randomized_block(config, seed: int = 0) -> TalanBlock:
    torch.manual_seed(seed)
    block = TalanBlock(config).float()
    with torch.no_grad():
        for param in block.parameters():  # a live gate, unlike the zero-init writeback
            param.copy_(torch.randn_like(param) * 0.05)
    return block.requires_grad_(False)


def check_parity(device: str = "cuda") -> dict:
    config = tiny_talan_config()
    cpu = randomized_block(config)
    gpu = randomized_block(config).to(device)
    lengths = [1, 5, 17, 64, 3]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    hidden = torch.randn(int(cu[-1]), config.hidden_size)
    want, want_state = cpu.perturbation(hidden, cu)
    got, got_state = gpu.perturbation(hidden.to(device), cu.to(device))
    packed = max((got.cpu() - want).abs().max().item(),
                  (got_state.cpu() - want_state).abs().max().item())
    # Token by token through the decode-step entry, all sequences in lockstep.
    state = empty_state(config, len(lengths), device)
    stepwise = 0.0
    for step in range(max(lengths)):
        rows = [i for i, n in enumerate(lengths) if step < n]
        x = torch.stack([hidden[int(cu[i]) + step] for i in rows]).to(device)
        delta, new = gpu.perturbation(x, None, state[rows])
        state[rows] = new
        expected = torch.stack([want[int(cu[i]) + step] for i in rows])
        stepwise = max(stepwise, (delta.cpu() - expected).abs().max().item())
    bf16_delta, _ = gpu.perturbation(hidden.to(device).bfloat16(), cu.to(device))
    scale = want.abs().max().item()
    bf16_rel = (bf16_delta.cpu() - want).abs().max().item() / scale
    return dict(ok=packed < 1e-5 and stepwise < 1e-5 and bf16_rel < 2e-2,
                max_abs_diff_packed=packed, max_abs_diff_stepwise=stepwise,
                bf16_stream_max_rel_diff=bf16_rel)


class DecodeStep:
    """The vLLM layer's one-token step on fixed buffers, as its ``run`` makes it: a set of
    one adapter (id 0, as a one-checkpoint server holds it), vLLM's metadata for the
    state indices and resume flags, each row's adapter id (0 on, -1 off) on the CPU for
    the plan and in the fixed-address buffer a captured graph reads."""

    def __init__(self, block: TalanBlock, batch: int, entries: int, dtype: torch.dtype):
        from talan_serve.adapter_set import TalanAdapterSet
        from talan_serve.adapter_spec import AdapterSetSpec
        from talan_serve.engine.side_path import SidePath

        config = block.config
        device = next(block.parameters()).device
        spec = AdapterSetSpec.of_config(config)
        self.point = config.connection_point
        self.side_path = SidePath(TalanAdapterSet(spec))
        self.side_path.add(0, config, block.state_dict(), device)
        self.states = torch.zeros(entries, *spec.state_shape, device=device)
        self.hidden = torch.zeros(batch, config.hidden_size, device=device, dtype=dtype)
        self.indices = torch.arange(batch, device=device, dtype=torch.long) * 2 + 1
        self.resume = torch.zeros(batch, device=device, dtype=torch.bool)
        self.enabled = torch.ones(batch, device=device, dtype=torch.bool)
        self.row_buffer = torch.zeros(batch, device=device, dtype=torch.long)
        self.rows_cpu = np.zeros(batch, dtype=np.int64)
        self.delta = torch.zeros(batch, config.hidden_size, device=device, dtype=dtype)

    def set_enabled(self, enabled: torch.Tensor) -> None:
        """Which rows run TALAN, as the vLLM plugin's row tracker hands them on."""
        self.enabled.copy_(enabled)
        self.rows_cpu[:] = enabled.long().cpu().numpy() - 1
        self.row_buffer.copy_(torch.from_numpy(self.rows_cpu))

    def __call__(self) -> None:
        from talan_serve.plugins.vllm.batch import VllmStateMetadata, step_batch

        batch = self.indices.shape[0]
        metadata = VllmStateMetadata(num_reqs=batch, num_tokens=batch,
                                     state_indices=self.indices, resume=self.resume,
                                     cu_seqlens=None)
        self.delta.copy_(self.side_path.step(
            self.hidden, self.point,
            step_batch(metadata, self.states, self.rows_cpu, self.row_buffer)))


def capture(step: DecodeStep) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def check_cuda_graph(device: str = "cuda") -> dict:
    """Graph replay vs eager; with ``device="cpu"`` (tests) both sides run eagerly."""
    config = tiny_talan_config()
    batch, steps = 8, 32
    block = randomized_block(config).to(device)
    graphed = DecodeStep(block, batch, 2 * batch + 2, torch.float32)
    eager = DecodeStep(block, batch, 2 * batch + 2, torch.float32)
    replay = capture(graphed).replay if device == "cuda" else graphed
    for step in (graphed, eager):
        step.states.zero_()
        step.set_enabled(torch.arange(batch, device=device) % 4 != 3)  # rows 3, 7 off
    mass_steps, max_diff = [], 0.0
    generator = torch.Generator(device=device).manual_seed(0)
    for index in range(steps):
        x = torch.randn(batch, config.hidden_size, device=device, generator=generator)
        for step in (graphed, eager):
            step.hidden.copy_(x)
            step.resume.fill_(index > 0)
        before = graphed.states[graphed.indices, :, -1].sum(-1).clone()
        replay()
        eager()
        if device == "cuda":
            torch.cuda.synchronize()
        after = graphed.states[graphed.indices, :, -1].sum(-1)
        mass_steps.append((after - before).tolist())
        max_diff = max(max_diff, (graphed.delta - eager.delta).abs().max().item(),
                       (graphed.states - eager.states).abs().max().item())
    on = [i for i in range(batch) if i % 4 != 3]
    off = [i for i in range(batch) if i % 4 == 3]
    on_ok = all(abs(row[i] - 1.0) < 1e-4 for row in mass_steps for i in on)
    off_ok = all(abs(row[i]) < 1e-6 for row in mass_steps for i in off)
    return dict(ok=on_ok and off_ok and max_diff < 1e-5, batch=batch, steps=steps,
                max_abs_diff_graph_vs_eager=max_diff, mass_plus_one_on_rows=on_ok,
                off_rows_untouched=off_ok, mass_steps_first=mass_steps[:2])


def time_cuda(fn, iters: int = 200) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3  # microseconds


def qwen3_8b_gemms(batch: int):
    """The bf16 weight GEMMs of one Qwen3-8B decode step: 36 layers' own weights (16 GB,
    uninitialised: only their traffic matters) and the LM head; no attention, no norms."""
    d, ffn, q, kv, vocab = 4096, 12288, 32 * 128, 8 * 128, 151936
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, ffn), (d, ffn), (ffn, d)]
    layers = [[torch.empty(i, o, device="cuda", dtype=torch.bfloat16) for i, o in shapes]
              for _ in range(36)]
    head = torch.empty(d, vocab, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(batch, d, device="cuda", dtype=torch.bfloat16)
    act = torch.randn(batch, ffn, device="cuda", dtype=torch.bfloat16)

    def run() -> None:
        for weights in layers:
            for (fan_in, _), w in zip(shapes, weights, strict=True):
                (act if fan_in == ffn else x) @ w
        x @ head

    return run


def check_timing() -> dict:
    block = randomized_block(preset("q8b")).cuda()
    rows = []
    for batch in (1, 8, 32):
        step = DecodeStep(block, batch, 2 * batch + 2, torch.bfloat16)
        step.hidden.normal_()
        step.resume.fill_(True)
        eager_us = time_cuda(step)
        graph = capture(step)
        graph_us = time_cuda(graph.replay)
        gemm_graph = torch.cuda.CUDAGraph()
        gemms = qwen3_8b_gemms(batch)
        gemms()
        with torch.cuda.graph(gemm_graph):
            gemms()
        model_us = time_cuda(gemm_graph.replay, iters=50)
        del gemm_graph, gemms
        torch.cuda.empty_cache()
        rows.append(dict(batch=batch, side_path_eager_us=eager_us, side_path_graph_us=graph_us,
                         qwen3_8b_gemms_us=model_us, graph_share=graph_us / model_us))
        log(f"batch {batch}: side path eager {eager_us:.1f} us, graph {graph_us:.1f} us; "
            f"Qwen3-8B GEMMs {model_us:.0f} us -> {100 * graph_us / model_us:.2f}%")
    return dict(ok=True, config="q8b", rows=rows)


def check_sglang_step(device: str = "cuda") -> dict:
    """SGLang's layer step on a server of many adapters: the captured decode step
    (graph-replayed; eager with ``device="cpu"``) against the eager planned step, with
    one adapter loaded after the capture (served by the captured stacks) and another of
    fewer slots."""
    from talan_serve.adapter_set import TalanAdapterSet
    from talan_serve.adapter_spec import AdapterSetSpec
    from talan_serve.engine.side_path import SidePath
    from talan_serve.plugins.sglang.layer import step_batch
    from talan_serve.switch import NO_ADAPTER

    config = tiny_talan_config()
    small = tiny_talan_config(n_themes=2, alpha=0.8)
    spec = AdapterSetSpec.covering([config, small], config.hidden_size, max_adapters=4)
    side_path = SidePath(TalanAdapterSet(spec)).to(device)
    side_path.add(1, config, randomized_block(config, 1).state_dict(), device)
    side_path.add(2, small, randomized_block(small, 2).state_dict(), device)
    point = config.connection_point
    real, padded, entries, steps = 6, 8, 16, 16
    index = torch.tensor([3, 5, 7, 9, 11, 13] + [-1] * (padded - real), device=device)
    entry_adapters = torch.full((entries,), NO_ADAPTER, dtype=torch.long, device=device)
    # Rows by adapter: 1, 2, TALAN off, 1, 2, 3 (loaded after the capture).
    entry_adapters[index[:real]] = torch.tensor([1, 2, NO_ADAPTER, 1, 2, 3], device=device)
    pools = {side: torch.zeros(entries, *spec.state_shape, device=device)
             for side in ("graph", "eager")}
    stream = torch.zeros(padded, config.hidden_size, device=device)
    out = torch.zeros_like(stream)

    def step() -> None:  # a captured decode step: each row's adapter read on the device
        batch = step_batch(pools["graph"], index, entry_adapters, padded)
        out.copy_(side_path.step(stream, point, batch))

    if device == "cuda":
        step()  # warm-up; then forget what it wrote
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    else:
        run = step
    third = tiny_talan_config(alpha=0.3)
    side_path.add(3, third, randomized_block(third, 3).state_dict(), device)
    rows = entry_adapters[index.clamp(min=0)].cpu().numpy()  # the CPU's rows, for the plan
    pools["graph"].zero_()
    generator = torch.Generator(device=device).manual_seed(1)
    max_diff, mass_ok = 0.0, True
    for _ in range(steps):
        stream.copy_(torch.randn(padded, config.hidden_size, device=device,
                                 generator=generator))
        before = pools["graph"][index[:real], :, -1].sum(-1).clone()
        run()
        eager = side_path.step(stream, point, step_batch(pools["eager"], index,
                                                         entry_adapters, padded,
                                                         rows_cpu=rows))
        if device == "cuda":
            torch.cuda.synchronize()
        gained = pools["graph"][index[:real], :, -1].sum(-1) - before
        want = (entry_adapters[index[:real]] != NO_ADAPTER).float()
        mass_ok &= bool((gained - want).abs().max() < 1e-4)
        max_diff = max(max_diff, (out[:real] - eager[:real]).abs().max().item(),
                       (pools["graph"][1:] - pools["eager"][1:]).abs().max().item())
    untouched = [e for e in range(1, entries) if e not in index.tolist()]
    clean = bool(pools["graph"][untouched].abs().max() == 0)
    return dict(ok=mass_ok and clean and max_diff < 1e-5, real_rows=real, padded_rows=padded,
                steps=steps, adapters_loaded_after_capture=1,
                max_abs_diff_graph_vs_eager=max_diff,
                mass_plus_one_on_rows_zero_off=mass_ok, other_entries_untouched=clean)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/gpu_h200")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__)
    for name, check in (("parity", check_parity), ("cuda_graph", check_cuda_graph),
                        ("sglang_step", check_sglang_step), ("timing", check_timing)):
        try:
            results[name] = check()
        except Exception as err:  # record, keep going
            results[name] = dict(ok=False, error=repr(err),
                                 traceback=traceback.format_exc()[-3000:])
        log(f"{name}: ok={results[name]['ok']}")
    (out / "gpu_block_check.json").write_text(json.dumps(results, indent=2) + "\n")
    sys.exit(0 if all(results[n]["ok"] for n in ("parity", "cuda_graph", "sglang_step", "timing"))
             else 1)


if __name__ == "__main__":
    main()
