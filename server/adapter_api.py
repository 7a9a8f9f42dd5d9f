"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter: adapters at run time.

vLLM's endpoints and field names, so that vLLM's clients and scripts work; here an
"adapter" is a talan-serve checkpoint (TALAN and/or LoRA) on the server's base model.
Off unless the server names the directories adapters may come from
(``--allowed-adapter-dirs``); behind the API key when one is set.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import PlainTextResponse, Response

from server.adapter_errors import AdapterError, ModelNotFoundError
from server.adapters import allowed_path
from server.errors import APIError, adapter_refused, bad_request, model_not_found
from server.http import parse
from server.schemas import LoadAdapterRequest, UnloadAdapterRequest
from server.state import ServerState


def _check_enabled(state: ServerState) -> None:
    if not state.settings.adapter_dirs:
        raise APIError(403, "loading and unloading adapters at run time is off on this "
                       "server; start it with --allowed-adapter-dirs DIR",
                       type="permission_error", code="adapter_loading_disabled")


async def load_adapter(state: ServerState, body: Any) -> Response:
    _check_enabled(state)
    request = parse(LoadAdapterRequest, body)
    try:
        path, root = allowed_path(request.lora_path, state.settings.adapter_dirs)
    except PermissionError as error:
        raise APIError(403, str(error), type="permission_error", param="lora_path",
                       code="adapter_path_not_allowed") from error
    if request.lora_name == state.backend.info.name:
        raise bad_request(f"{request.lora_name!r} is the base model's name", param="lora_name")
    try:
        await state.backend.load_adapter(request.lora_name, str(path), within=root)
    except AdapterError as error:  # validated as every adapter is (talan_serve.adapter_files)
        raise adapter_refused(error, param="lora_path") from error
    return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' added successfully.")


async def unload_adapter(state: ServerState, body: Any) -> Response:
    _check_enabled(state)
    request = parse(UnloadAdapterRequest, body)
    try:
        await state.backend.unload_adapter(request.lora_name)
    except ModelNotFoundError as error:
        raise model_not_found(str(error)) from error
    return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' removed successfully.")
