"""The SGLang plugin without an engine: the SGLang surface it relies on, its entry point and
hooks, the state declared to SGLang's pool, the refusals, and the switch read the same on
both sides of the seam."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


def test_sglang_surface():
    """Fails loudly when an SGLang upgrade moves a name the plugin uses (_compat.py)."""
    from talan_serve.hosts import HOSTS
    from talan_serve.plugins.sglang import _compat

    assert _compat.sglang_version() in _compat.TARGET_SGLANG_VERSIONS
    for key in _compat.SYMBOLS:
        assert _compat.resolve(key) is not None, key
    assert set(_compat.HOST_MODULES) == set(HOSTS)  # derived from the one table
    for host, module in _compat.HOST_MODULES.items():
        assert hasattr(__import__(module, fromlist=[host]), host)


def test_entry_point_registers_the_plugin_and_its_hooks():
    from importlib.metadata import entry_points

    from sglang.srt.plugins import load_plugins

    from talan_serve.hosts import TALAN_ARCHITECTURES
    from talan_serve.plugins.sglang import _compat
    from talan_serve.plugins.sglang.rows import hooks_applied

    plugins = {e.name: e.value for e in entry_points(group="sglang.srt.plugins")}
    assert plugins["talan"] == "talan_serve.plugins.sglang:register"
    load_plugins()  # what every SGLang process does: run the plugins, then apply hooks
    assert hooks_applied() == {"sampling_verify": True, "req_init": True,
                               "forward_batch_init_new": True}
    assert hasattr(_compat.resolve("check_server_args"), "__wrapped__")
    specs = _compat.resolve("linear_attn_specs")
    (spec,) = [s for s in specs if s.backend_class_name == _compat.STATE_BACKEND_CLASS]
    assert set(spec.arch_names) == set(TALAN_ARCHITECTURES)
    from talan_serve.plugins.sglang.models import talan

    assert tuple(c.__name__ for c in talan.EntryClass) == TALAN_ARCHITECTURES


def test_state_declared_to_the_pool(tiny_model, tmp_path):
    import torch
    from transformers import AutoConfig

    from talan_serve.plugins.sglang.config import is_talan_config
    from talan_serve.prepared import prepare_model_dir
    from talan_serve.testing import build_tiny_checkpoint

    host = tiny_model("qwen3")
    checkpoint = build_tiny_checkpoint(host, tmp_path / "ck", n_themes=5,
                                       connection_point="layer_2")
    folder = prepare_model_dir(checkpoint, tmp_path / "served", base_model_dir=host).path
    config = AutoConfig.from_pretrained(folder)
    assert is_talan_config(config)
    params = config.mamba2_cache_params
    assert params.shape.conv[0] == (5, 129) == config.talan_adapter_spec.state_shape
    assert params.dtype.conv == torch.float32 and params.layers == [2]
    assert config.full_attention_layer_ids == [0, 1, 2, 3]
    assert not is_talan_config(AutoConfig.from_pretrained(host))  # the plain host

    # A base for many adapters: one state per request, under the first point's layer.
    from talan_serve.adapter_spec import AdapterSetSpec
    from talan_serve.prepared import prepare_adapter_base

    spec = AdapterSetSpec(128, 6, ("layer_1", "embedding"), max_adapters=4)
    many = AutoConfig.from_pretrained(prepare_adapter_base(host, tmp_path / "many", spec))
    assert is_talan_config(many)
    assert many.mamba2_cache_params.shape.conv[0] == (6, 129)
    assert many.mamba2_cache_params.layers == [1]


@pytest.mark.parametrize(("field", "value"), [
    ("speculative_algorithm", "EAGLE"), ("enable_dp_attention", True),
    ("enable_two_batch_overlap", True), ("mamba_radix_cache_strategy", "extra_buffer"),
    ("disaggregation_mode", "prefill"),
])
def test_refusals_name_what_would_break_the_state(field, value):
    from talan_serve.plugins.sglang.guards import _raise_for, problems

    view = SimpleNamespace(**{field: value})
    found = problems(view)
    assert len(found) == 1
    with pytest.raises(ValueError, match="not supported for TALAN models|do not support"):
        _raise_for(found)
    assert problems(SimpleNamespace()) == []


MISSING = object()
SWITCH_TABLE = [
    (MISSING, True), (None, True), ({}, True), ({"enabled": True}, True),
    ({"enabled": False}, False),
    ({"enabled": "no"}, "refused"), ({"on": True}, "refused"), ("off", "refused"),
    ([], "refused"), ({"enabled": False, "why": "x"}, "refused"),
]


@pytest.mark.parametrize(("value", "expected"), SWITCH_TABLE)
def test_switch_has_one_answer_on_both_sides_of_the_seam(value, expected):
    """The server's SGLang backend, the plugin's admission check and the radix-cache key
    agree on every value (the vLLM side has the same table)."""
    from server.backends.base import ModelInfo
    from server.backends.sglang import sampling_params
    from server.errors import APIError
    from server.http import parse
    from server.sampling import sampling_options
    from server.schemas import CompletionRequest
    from talan_serve.plugins.sglang.rows import OFF_MARKER, _after_req_init, row_adapter
    from talan_serve.switch import NO_ADAPTER, SwitchError

    def request_enabled(params):
        return row_adapter(params) != NO_ADAPTER

    def answer(call):
        try:
            return call()
        except (APIError, SwitchError):
            return "refused"

    direct = SimpleNamespace(custom_params=None if value is MISSING else {"talan": value})

    def cache_key():
        req = SimpleNamespace(sampling_params=direct, extra_key=None)
        _after_req_init(None, req)
        return req.extra_key != OFF_MARKER

    assert answer(lambda: request_enabled(direct)) == answer(cache_key) == expected
    body = {"prompt": "a"} if value is MISSING else {"prompt": "a", "talan": value}
    info = ModelInfo("m", 64, None, 100, True, "float32")
    server = answer(lambda: sampling_options(parse(CompletionRequest, body), info, 4, None))
    if expected == "refused":
        assert server == "refused"
        return
    built = SimpleNamespace(custom_params=sampling_params(server, None)["custom_params"])
    assert request_enabled(built) is expected


class _SidePath:
    """A TALAN layer's side path as the scheduler's RPC methods reach it (recorded);
    adapter 5 cannot be added."""

    def __init__(self):
        self.calls = []

    def unload(self, adapter):
        self.calls.append(("unload", adapter))

    def add(self, adapter, config, tensors, device):
        if adapter == 5:
            raise ValueError("no room for adapter 5")
        self.calls.append(("add", adapter, sorted(tensors)))


def test_scheduler_applies_talan_changes_one_by_one_and_reports_the_failed(tmp_path):
    """``talan_apply_changes`` through SGLang's own RPC handler and request type: each
    change applied whether or not another fails, the failures by index in the call's
    message (read back by the front end), and the parameters formatted by their names
    (SGLang formats them for a log line, weights included, at every call)."""
    import torch
    from safetensors.torch import save
    from sglang.srt.managers.io_struct import RpcReqInput

    from talan_serve.plugins.sglang import _compat
    from talan_serve.plugins.sglang.rpc import _around_rpc, failed_changes
    from talan_serve.testing import tiny_talan_config

    side_path = _SidePath()
    layer = SimpleNamespace(side_path=side_path)
    model = SimpleNamespace(talan=layer, parameters=lambda: iter([torch.zeros(1)]))
    scheduler = SimpleNamespace(
        tp_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model)),
        tp_group=SimpleNamespace(cpu_group=None))
    weights, config = save({"w": torch.ones(2)}), tiny_talan_config().to_dict()
    changes = [[3, [4, config, weights]], [None, [5, config, weights]], [6, None]]
    request = RpcReqInput(method="talan_apply_changes", parameters={"changes": changes})
    handler = _compat.resolve("scheduler_rpc")
    # The handler syncs the tensor-parallel ranks after each call: one rank here.
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}",
                                         rank=0, world_size=1)
    try:
        answer = _around_rpc(getattr(handler, "__wrapped__", handler), scheduler, request)
    finally:
        torch.distributed.destroy_process_group()
    assert side_path.calls == [("unload", 3), ("add", 4, ["w"]), ("unload", 6)]
    assert answer.success is False
    assert failed_changes(answer.message) == {1: "ValueError: no room for adapter 5"}
    assert failed_changes("the scheduler is gone") is None
    assert repr(request.parameters) == "<changes>"
