"""End-to-end on a GPU: Mesa vs stock FLASH_ATTN inside vLLM, same run.

    python benchmarks/bench_gpu_e2e.py [--parts correctness,passkey,speed] [--lengths ...]
        [--backends FLASH_ATTN,mesa] [--out DIR]

1. Correctness within the training length, the bundled trained model in bf16, CUDA graphs
   on: greedy tokens equal FLASH_ATTN's, prompt logprobs within a bf16 tolerance.
2. The bundled passkey model (if present), through the Mesa backend: accuracy at 1x..32x.
3. Speed, Llama-2-7B shape with dummy weights: prefill seconds (best of 2) and decode
   ms/token for FLASH_ATTN and MESA, each engine in its own process, in vLLM's default mode
   (torch.compile + CUDA graphs: FULL_AND_PIECEWISE for FLASH_ATTN; Mesa's attention runs
   between the piecewise graphs).  BENCH_EAGER=1 runs both eager instead;
   BENCH_KV_DTYPE (e.g. fp8) sets --kv-cache-dtype for every engine (recorded with the KV
   block count in speed-<backend>.json).
Prints Markdown tables and writes results JSON to --out (or $OUT).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LLAMA2_7B = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    vocab_size=32000,
    rope_theta=10000.0,
    torch_dtype="bfloat16",
    bos_token_id=1,
    eos_token_id=2,
    hidden_act="silu",
    tie_word_embeddings=False,
)


def log(msg: str) -> None:
    print(msg, flush=True)


def _free(llm) -> None:
    # stop the engine-core process so its GPU memory is released before the next engine
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as exc:  # best effort: report, keep going
        log(f"engine shutdown: {exc}")
    del llm
    gc.collect()
    torch.cuda.empty_cache()


LOGPROB_TOL = 5e-2  # bf16: max |prompt logprob difference| between two bf16 backends


def correctness(workdir: Path) -> dict:
    """Within the training length Mesa must be stock attention: the bundled trained model
    (bf16, well-separated logits, unlike a random-weight model whose top-2 logits tie) on
    passkey prompts up to L, greedy tokens equal to FLASH_ATTN's and prompt logprobs within
    ``LOGPROB_TOL``; plus long prompts (4x / 31x L) served without error."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from mesa_vllm.eval.data import passkey_sample
    from mesa_vllm.testing.cases import PASSKEY_MODEL_MESA

    del workdir
    model = ROOT / "mesa_vllm" / "assets" / "models" / "passkey-llama"
    L = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    tok = AutoTokenizer.from_pretrained(str(model))
    prompts = [
        tok.encode(passkey_sample(tok, n, rng=random.Random(i)).prompt)
        for i, n in enumerate((90, 140, 190, 230, 236, 238))
    ]
    prompts = [p for p in prompts if len(p) + 16 <= L]
    sp = SamplingParams(temperature=0, max_tokens=16, prompt_logprobs=0)
    outs = {}
    for backend in ("FLASH_ATTN", "mesa"):
        kw = dict(
            model=str(model),
            dtype="bfloat16",
            max_model_len=8192 if backend == "mesa" else L,
            enforce_eager=False,
            gpu_memory_utilization=0.3,
            attention_backend=backend,
        )
        if backend == "mesa":
            kw["additional_config"] = {"mesa": {**PASSKEY_MODEL_MESA, "train_len": L}}
        llm = LLM(**kw)
        res = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        outs[backend] = [
            (
                list(o.outputs[0].token_ids),
                [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:], strict=True)],
            )
            for o, p in zip(res, prompts, strict=True)
        ]
        if backend == "mesa":
            rng = random.Random(0)
            long = [[1] + [rng.randrange(3, 400) for _ in range(n)] for n in (4 * L, 31 * L)]
            lres = llm.generate(
                [{"prompt_token_ids": p} for p in long],
                SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                use_tqdm=False,
            )
            outs["mesa_long_ok"] = all(len(o.outputs[0].token_ids) == 8 for o in lres)
        _free(llm)
    same = [a[0] == b[0] for a, b in zip(outs["FLASH_ATTN"], outs["mesa"], strict=True)]
    dlp = max(
        abs(x - y)
        for a, b in zip(outs["FLASH_ATTN"], outs["mesa"], strict=True)
        for x, y in zip(a[1], b[1], strict=True)
    )
    return {
        "prompt_lengths": [len(p) for p in prompts],
        "greedy_equal": same,
        "max_prompt_logprob_diff": dlp,
        "logprob_tolerance": LOGPROB_TOL,
        "pass": all(same) and dlp <= LOGPROB_TOL,
        "mesa_long_prompts_ok": outs["mesa_long_ok"],
    }


def passkey(multiples: list[int], samples: int) -> dict:
    model = ROOT / "mesa_vllm" / "assets" / "models" / "passkey-llama"
    if not (model / "model.safetensors").exists():
        return {"skipped": "no bundled passkey model"}
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from mesa_vllm.eval.data import passkey_sample, score
    from mesa_vllm.testing.cases import PASSKEY_MODEL_MESA

    L = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    tok = AutoTokenizer.from_pretrained(str(model))
    llm = LLM(
        model=str(model),
        dtype="float32",
        max_model_len=max(multiples) * L + 64,
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        attention_backend="mesa",
        additional_config={"mesa": {**PASSKEY_MODEL_MESA, "train_len": L}},
    )
    sp = SamplingParams(temperature=0, max_tokens=8)
    acc = {}
    for m in multiples:
        batch = [
            passkey_sample(tok, m * L, rng=random.Random(1000 * m + i)) for i in range(samples)
        ]
        res = llm.generate([s.prompt for s in batch], sp, use_tqdm=False)
        acc[m] = (
            sum(score(o.outputs[0].text, s.answer) for o, s in zip(res, batch, strict=True))
            / samples
        )
        log(f"passkey (GPU, mesa) {m}x L: {acc[m]:.2f}")
    _free(llm)
    return acc


def llama7b_engine_kwargs(backend: str, max_len: int, workdir: Path) -> dict:
    """LLM(...) arguments of the speed runs: Llama-2-7B shape, dummy bf16 weights, one
    sequence at a time, prefix caching off; stock backends get the RoPE table raised."""
    model = workdir / "llama2-7b-shape"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(LLAMA2_7B))
    kw = dict(
        model=str(model),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=max_len,
        gpu_memory_utilization=0.85,
        max_num_seqs=1,
        max_num_batched_tokens=16384,
        attention_backend=backend,
    )
    if backend != "mesa":
        kw["enable_prefix_caching"] = False
        kw["hf_overrides"] = {"max_position_embeddings": max_len}
    return kw


def speed_one(
    backend: str, workdir: Path, lengths: list[int], decode_tokens: int, save=None
) -> dict:
    """One engine (default mode: torch.compile + CUDA graphs, as users run it); ``save(res)``
    after each length, so a run stopped by its timeout keeps the lengths it finished."""
    from vllm import LLM, SamplingParams

    kw = llama7b_engine_kwargs(backend, max(lengths) + decode_tokens + 8, workdir)
    kw["enforce_eager"] = os.environ.get("BENCH_EAGER") == "1"
    kw["kv_cache_dtype"] = os.environ.get("BENCH_KV_DTYPE", "auto")
    t0 = time.time()
    llm = LLM(**kw)
    res: dict = {"startup_s": time.time() - t0}
    res["MESA_VLLM_DECODE_KERNEL"] = os.environ.get("MESA_VLLM_DECODE_KERNEL", "")
    res["kv_cache_dtype"] = kw["kv_cache_dtype"]
    cc = llm.llm_engine.vllm_config.cache_config
    res["num_gpu_blocks"], res["block_size"] = cc.num_gpu_blocks, cc.block_size
    log(f"[{backend}] engine up in {res['startup_s']:.0f} s, {cc.num_gpu_blocks} KV blocks")
    for n in lengths:
        prompt = {"prompt_token_ids": [random.Random(n).randrange(3, 31000) for _ in range(n)]}
        pre = []
        for _ in range(2):
            t = time.perf_counter()
            llm.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
            pre.append(time.perf_counter() - t)
        runs = []
        for _ in range(2):  # the first run also pays any kernel JIT for this length
            t = time.perf_counter()
            llm.generate(
                [prompt],
                SamplingParams(max_tokens=decode_tokens + 1, ignore_eos=True),
                use_tqdm=False,
            )
            runs.append(time.perf_counter() - t)
        decode_ms = (runs[-1] - min(pre)) / decode_tokens * 1000
        res[str(n)] = (min(pre), decode_ms)
        if save:
            save(res)
        res[f"{n}_first_decode_ms"] = (runs[0] - min(pre)) / decode_tokens * 1000
        log(f"[{backend}] T={n}: prefill {min(pre):.3f} s, decode {decode_ms:.2f} ms/token")
    return res


def speed(out: Path, lengths: list[int], backends: list[str], timeout: int) -> dict:
    """Each backend in its own process (a finished engine's GPU memory is then surely free)."""
    import subprocess

    results = {}
    running: list[subprocess.Popen] = []

    def stop_group(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def on_sigterm(*_) -> None:  # first thing: the engine goes (`timeout` may signal twice)
        for proc in running:
            stop_group(proc)
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    for backend in backends:
        path = out / f"speed-{backend}.json"
        cmd = [
            sys.executable,
            __file__,
            "--speed-one",
            backend,
            "--lengths",
            ",".join(map(str, lengths)),
            "--out",
            str(out),
        ]
        log(f"== speed {backend}: {' '.join(cmd)}")
        path.unlink(missing_ok=True)
        # its own process group: on a timeout the engine-core process it started goes too
        # (left alive, it would hold the GPU memory the next backend needs)
        proc = subprocess.Popen(cmd, start_new_session=True)
        running[:] = [proc]
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:  # what is left of its group goes, also on SIGTERM (on_sigterm: SystemExit)
            stop_group(proc)
            proc.wait()
        results[backend] = json.loads(path.read_text()) if path.exists() else {}
        if rc != 0:
            results[backend]["failed"] = rc
    return results


def speed_table(results: dict, lengths: list[int]) -> str:
    rows = [
        "| prompt | FLASH_ATTN prefill s | MESA prefill s | ratio | FLASH_ATTN decode "
        "ms/tok | MESA decode ms/tok | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    fa, me = results.get("FLASH_ATTN", {}), results.get("mesa", {})
    for n in lengths:
        if str(n) not in fa or str(n) not in me:
            rows.append(f"| {n} | {fa.get(str(n))} | {me.get(str(n))} | | | | |")
            continue
        (fp, fd), (mp, md) = fa[str(n)], me[str(n)]
        rows.append(
            f"| {n} | {fp:.3f} | {mp:.3f} | {mp / fp:.2f} | {fd:.2f} | {md:.2f} | {md / fd:.2f} |"
        )
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--parts", default="correctness,passkey,speed")
    ap.add_argument("--lengths", default="4096,32768,131072")
    ap.add_argument("--backends", default="FLASH_ATTN,mesa")
    ap.add_argument("--multiples", default="1,2,4,8,16,32")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--speed-timeout", type=int, default=280)
    ap.add_argument("--speed-one", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/gpu")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path("/tmp/mesa-gpu-bench")
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.speed_one:
        path = args.out / f"speed-{args.speed_one}.json"
        save = lambda res: path.write_text(json.dumps(res, indent=1))  # noqa: E731
        save(speed_one(args.speed_one, workdir, lengths, decode_tokens=64, save=save))
        return 0
    parts = args.parts.split(",")
    results: dict = {"device": torch.cuda.get_device_name(0), "parts": parts}
    if "correctness" in parts:
        log("== correctness (tiny Llama, bf16)")
        results["correctness"] = correctness(workdir)
        log(json.dumps(results["correctness"]))
    if "passkey" in parts:
        log("== passkey on GPU")
        results["passkey"] = passkey([int(x) for x in args.multiples.split(",")], args.samples)
    if "speed" in parts:
        log("== speed (Llama-2-7B shape, dummy weights)")
        results["speed"] = speed(args.out, lengths, args.backends.split(","), args.speed_timeout)
        results["speed_table"] = speed_table(results["speed"], lengths)
        log(results["speed_table"])
    name = "gpu_e2e-" + "-".join(parts) + ".json"
    (args.out / name).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
