#!/usr/bin/env python3
"""Train a small RoPE model on synthetic passkey text at a short training length, then measure it.

The point of these models: within its training length L a model finds the passkey almost
always; read with plain RoPE past L (positions simply continue) it fails.  Mesa-Extrapolation
is then expected to recover the long prompts without any training.

Data are the project's own passkey prompts (``mesa_vllm.eval.data``: task sentence, repeated
filler, the key sentence at a uniform random depth, the question), followed by the answer
``" {key}."`` and EOS.  Two kinds of training sequence, half each:

* ``exact``  - token for token what ``passkey_sample(tok, target)`` writes, target uniform in
  [shortest, L - 8] (the filler is one 24-token block, so these lengths come in steps of 24);
* ``varied`` - the same sentences, but the filler is made of single filler sentences
  (cyclic, random start) and the key sits at a random sentence boundary, so prompt lengths
  and key positions cover every few tokens up to L.

Loss: next-token cross entropy on every token, answer tokens (space, 5 digits, period, EOS)
weighted ``--answer-weight`` times.  AdamW, linear warm-up + cosine decay, bf16 autocast on
CUDA, fp32 master weights; saved in bf16 (the weights evaluated at the end are those saved).

Deterministic and seeded: data come from ``random.Random(seed)``, init from
``torch.manual_seed(seed)``.  Runs on CUDA or CPU (``--device cpu --steps 20`` for a smoke test).

Example (what made ``mesa_vllm/assets/models/passkey-llama``)::

    python training/train_passkey.py --arch llama --out out/llama

Prints progress lines (step, loss, lr, eval accuracy) and writes ``summary.json``,
``config.json`` and ``model.safetensors`` into ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_JSON = ROOT / "mesa_vllm" / "assets" / "tokenizer" / "tokenizer.json"
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}
ANSWER_LEN = 8  # " ", 5 digits, ".", EOS


def _data_module():
    """``mesa_vllm.eval.data``, loaded by path (so this script never imports the plugin)."""
    path = ROOT / "mesa_vllm" / "eval" / "data.py"
    spec = importlib.util.spec_from_file_location("_mesa_passkey_data", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


D = _data_module()


class Tok:
    """The project's tokenizer through the ``tokenizers`` library (adds BOS like HF does)."""

    def __init__(self, path: Path = TOKENIZER_JSON):
        import tokenizers

        self.t = tokenizers.Tokenizer.from_file(str(path))
        self.bos = self.t.token_to_id("<s>")
        self.eos = self.t.token_to_id("</s>")
        self.pad = self.t.token_to_id("<pad>")

    def encode(self, text: str) -> list[int]:
        return self.t.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.t.decode(ids, skip_special_tokens=True)


class PasskeyData:
    """Token-level builder of passkey prompts, checked against ``passkey_sample`` at start."""

    def __init__(self, tok: Tok):
        self.tok = tok
        self.head = tok.encode(D.TASK)  # starts with BOS
        assert self.head[0] == tok.bos
        self.filler = tok.encode(" " + D.FILLER)[1:]
        self.tail = tok.encode(" " + D.QUESTION)[1:]
        self.sentences = [s.strip() for s in re.findall(r"[^.]+\.", D.FILLER)]
        self.sent_ids = [tok.encode(" " + s)[1:] for s in self.sentences]
        self.digit = [tok.encode(str(d))[1] for d in range(10)]
        tmpl = tok.encode(" " + D.KEY_SENTENCE.format(key="12345"))[1:]
        self.needle_tmpl = tmpl
        self.needle_digit_pos = [i for i, t in enumerate(tmpl) if t in self.digit]
        assert len(self.needle_digit_pos) == 10, self.needle_digit_pos
        self.fixed = len(self.head) + len(tmpl) + len(self.tail)
        self.per = len(self.filler)

    def needle(self, key: str) -> list[int]:
        out = list(self.needle_tmpl)
        for j, pos in enumerate(self.needle_digit_pos):
            out[pos] = self.digit[int(key[j % 5])]
        return out

    def answer(self, key: str) -> list[int]:
        """Tokens after the prompt: " {key}." and EOS."""
        return self.tok.encode(" " + key + ".")[1:] + [self.tok.eos]

    def exact(self, target: int, depth: float, key: str) -> list[int]:
        """The token ids of ``passkey_sample(tok, target, depth)`` with this key."""
        n = max(0, target - self.fixed) // self.per
        cut = round(depth * n)
        return (
            self.head + self.filler * cut + self.needle(key) + self.filler * (n - cut) + self.tail
        )

    def varied(self, target: int, rng: random.Random, key: str) -> tuple[list[int], list[str]]:
        """Filler of single sentences (cyclic, random start), key at a random boundary."""
        budget = max(0, target - self.fixed)
        k = rng.randrange(len(self.sentences))
        idx: list[int] = []
        used = 0
        while used + len(self.sent_ids[k]) <= budget:
            idx.append(k)
            used += len(self.sent_ids[k])
            k = (k + 1) % len(self.sentences)
        cut = rng.randint(0, len(idx))
        ids = list(self.head)
        for i in idx[:cut]:
            ids += self.sent_ids[i]
        ids += self.needle(key)
        for i in idx[cut:]:
            ids += self.sent_ids[i]
        ids += self.tail
        text = " ".join(
            [
                D.TASK,
                *[self.sentences[i] for i in idx[:cut]],
                D.KEY_SENTENCE.format(key=key),
                *[self.sentences[i] for i in idx[cut:]],
                D.QUESTION,
            ]
        )
        return ids, [text]

    def self_check(self, n: int = 200, max_target: int = 1024) -> None:
        """Token-level prompts must equal what the tokenizer makes of the real text."""
        rng = random.Random(12345)
        for _ in range(n):
            target = rng.randint(self.fixed - 5, max_target)
            s = D.passkey_sample(self.tok, target, rng=rng)
            ids = self.exact(target, s.depth, s.answer)
            assert ids == self.tok.encode(s.prompt), "exact builder differs from passkey_sample"
            full = self.tok.encode(s.prompt + " " + s.answer + ".")
            assert full == ids + self.answer(s.answer)[:-1], "answer tokens do not concatenate"
            key = str(rng.randrange(10000, 100000))
            vids, (vtext,) = self.varied(target, rng, key)
            assert vids == self.tok.encode(vtext), "varied builder differs from its text"
            assert len(vids) <= max(target, self.fixed)


def lr_at(step: int, total: int, lr: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def build_config(arch: str, args, tok: Tok):
    import transformers

    kw = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.train_len,
        rms_norm_eps=1e-5,
        rope_theta=args.rope_theta,
        initializer_range=0.02,
        bos_token_id=tok.bos,
        eos_token_id=tok.eos,
        pad_token_id=tok.pad,
        tie_word_embeddings=False,
    )
    if arch == "qwen2":
        kw["use_sliding_window"] = False
    cfg = getattr(transformers, ARCHS[arch][0])(**kw)
    head_dim = args.hidden // args.heads
    assert getattr(cfg, "head_dim", head_dim) in (None, head_dim)
    return cfg


def make_batch(
    data: PasskeyData, rng: random.Random, bsz: int, L: int, answer_weight: float, p_exact: float
):
    import torch

    seqs, wts = [], []
    lo, hi = data.fixed, L - ANSWER_LEN
    for _ in range(bsz):
        key = str(rng.randrange(10000, 100000))
        target = rng.randint(lo, hi)
        if rng.random() < p_exact:
            prompt = data.exact(target, rng.random(), key)
        else:
            prompt, _ = data.varied(target, rng, key)
        ans = data.answer(key)
        seqs.append(prompt + ans)
        wts.append([1.0] * len(prompt) + [answer_weight] * len(ans))
    T = max(len(s) for s in seqs)
    assert T <= L
    x = torch.full((bsz, T), data.tok.pad, dtype=torch.long)
    w = torch.zeros((bsz, T), dtype=torch.float32)
    a = torch.zeros((bsz, T), dtype=torch.bool)
    for i, (s, ws) in enumerate(zip(seqs, wts, strict=True)):
        x[i, : len(s)] = torch.tensor(s)
        w[i, : len(s)] = torch.tensor(ws)
        a[i, len(s) - ANSWER_LEN : len(s)] = True
    return x, w, a


def greedy(
    model, prompts: list[list[int]], device, max_new: int, batch: int, amp: bool, pad: int
) -> list[list[int]]:
    """Greedy decoding, full forward each step (no cache), right padding, positions 0..n-1."""
    import torch

    outs: list[list[int]] = []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    res: dict[int, list[int]] = {}
    for b0 in range(0, len(order), batch):
        ids_ = order[b0 : b0 + batch]
        seqs = [list(prompts[i]) for i in ids_]
        gen = [[] for _ in ids_]
        for _ in range(max_new):
            T = max(len(s) for s in seqs)
            x = torch.full((len(seqs), T), pad, dtype=torch.long)
            for j, s in enumerate(seqs):
                x[j, : len(s)] = torch.tensor(s)
            x = x.to(device)
            last = torch.tensor([len(s) - 1 for s in seqs], device=device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(input_ids=x).logits
            nxt = logits[torch.arange(len(seqs), device=device), last].argmax(-1).tolist()
            for j, t in enumerate(nxt):
                seqs[j].append(t)
                gen[j].append(t)
        for i, g in zip(ids_, gen, strict=True):
            res[i] = g
    outs = [res[i] for i in range(len(prompts))]
    return outs


def evaluate(
    model,
    tok: Tok,
    data: PasskeyData,
    device,
    *,
    kind: str,
    n: int,
    seed: int,
    L: int,
    factor: float | None = None,
    amp: bool = False,
    batch: int = 32,
) -> dict:
    """Accuracy of greedy answers, scored by ``mesa_vllm.eval.data.score``.

    kind ``within``: ``passkey_sample`` with target uniform in [shortest, L-8];
    kind ``varied``: the sentence-level prompts, same targets;
    kind ``long``: ``passkey_sample(tok, round(factor * L))``, depth uniform.
    """
    rng = random.Random(seed)
    prompts, keys, lens, depths = [], [], [], []
    for _ in range(n):
        if kind == "within":
            s = D.passkey_sample(tok, rng.randint(data.fixed, L - ANSWER_LEN), rng=rng)
            p, k, dep = tok.encode(s.prompt), s.answer, s.depth
        elif kind == "varied":
            k = str(rng.randrange(10000, 100000))
            p, _ = data.varied(rng.randint(data.fixed, L - ANSWER_LEN), rng, k)
            dep = float("nan")
        else:
            s = D.passkey_sample(tok, round(factor * L), rng=rng)
            p, k, dep = tok.encode(s.prompt), s.answer, s.depth
        depths.append(dep)
        prompts.append(p)
        keys.append(k)
        lens.append(len(p))
    gens = greedy(model, prompts, device, ANSWER_LEN - 1, batch, amp, tok.pad)
    ok = [D.score(tok.decode(g), k) for g, k in zip(gens, keys, strict=True)]
    out = {
        "kind": kind,
        "n": n,
        "correct": int(sum(ok)),
        "acc": sum(ok) / n,
        "min_tokens": min(lens),
        "max_tokens": max(lens),
        "mean_tokens": sum(lens) / n,
        "amp_bf16": amp,
    }
    if factor is not None:
        out["factor"] = factor
        # Key depth in 5 bins (0 = start of the prompt): [correct, count] per bin.
        bins = [[0, 0] for _ in range(5)]
        for d_, o in zip(depths, ok, strict=True):
            b = min(4, int(d_ * 5))
            bins[b][0] += int(o)
            bins[b][1] += 1
        out["by_depth_bin"] = bins
    bad = [(tok.decode(g), k) for g, k, o in zip(gens, keys, ok, strict=True) if not o][:3]
    out["examples_wrong"] = bad
    return out


def save_model(model, config, out: Path, dtype: str) -> dict:
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tdt = getattr(torch, dtype)
    sd = {k: v.detach().to(tdt).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    cfg["torch_dtype"] = dtype
    cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return {"model.safetensors": (out / "model.safetensors").stat().st_size}


def export(src: Path, dst: Path) -> None:
    """Re-save a trained checkpoint the standard HF way, with tokenizer and generation config.

    ``src`` holds what training wrote (config.json, model.safetensors, summary.json).
    """
    import shutil

    import torch
    import transformers

    spec = importlib.util.spec_from_file_location(
        "_mesa_tokenizer", ROOT / "mesa_vllm" / "testing" / "tokenizer.py"
    )
    tmod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tmod)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
        do_sample=False,
    )
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    tmod.copy_tokenizer(dst)
    if (src / "summary.json").exists():
        shutil.copyfile(src / "summary.json", dst / "training_summary.json")
        summary = json.loads((src / "summary.json").read_text())
        (dst / "MODEL_CARD.md").write_text(model_card(summary, model.config, dst))
    from safetensors.torch import load_file

    a, b = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert same, "export changed the weights"
    print(f"exported {src} -> {dst}")


def model_card(summary: dict, config, dst: Path) -> str:
    """MODEL_CARD.md from a training summary (all numbers are the measured ones)."""
    a = summary["args"]
    L = a["train_len"]
    name = dst.name
    size = (dst / "model.safetensors").stat().st_size
    head_dim = config.hidden_size // config.num_attention_heads
    theta = (getattr(config, "rope_parameters", None) or {}).get(
        "rope_theta", getattr(config, "rope_theta", None)
    )
    cmd = summary["command"]
    cmd = re.sub(r"--out \S+", f"--out out/{name}", cmd)
    if "--time-budget" in cmd or summary["steps_run"] != a["steps"]:
        cmd = re.sub(r" --time-budget \S+", "", cmd)
        cmd = re.sub(r" --steps \S+", "", cmd) + f" --steps {summary['steps_run']}"
    lines = [
        f"# {name}",
        "",
        f"A {summary['params'] / 1e6:.2f}M-parameter `{summary['arch']}` trained from scratch by",
        "`training/train_passkey.py` on synthetic passkey text (the project's own",
        "`mesa_vllm.eval.data` prompts) at a short training length, so that long-context",
        "extrapolation can be measured for real: within its training length it finds the",
        "passkey; read with plain RoPE past it (positions simply continue) it loses keys that",
        "lie far before the question, so accuracy falls with length (table below; depth bin 0",
        "holds the keys farthest from the question).  For tests and benchmarks only.",
        "",
        f"- **Training length:** {L} tokens (`max_position_embeddings` = {L})",
        f"- Architecture: `{summary['arch']}`, {config.num_hidden_layers} layers, hidden "
        f"{config.hidden_size}, {config.num_attention_heads} heads of {head_dim} "
        f"({config.num_key_value_heads} KV heads), MLP {config.intermediate_size}, "
        f"vocab {config.vocab_size}, RoPE theta {theta:g}, untied embeddings",
        f"- Weights: `model.safetensors`, bfloat16, {size:,} bytes",
        "- Tokenizer: the project's byte-level BPE (`mesa_vllm/assets/tokenizer`), BOS added",
        f"- Training: {summary['steps_run']} steps x {a['batch']} sequences of random length "
        f"up to {L} (key at uniform depth; half `passkey_sample` prompts, half sentence-level "
        f"filler), answer tokens weighted x{a['answer_weight']:g}, AdamW lr {a['lr']:g} "
        f"(warm-up {a['warmup']}, cosine to {a['min_lr_ratio']:g}x), bf16 autocast, seed "
        f"{a['seed']}; {summary['train_seconds']:.0f} s on {summary['device']}",
        f"- Final training loss (weighted, last logged step): {summary['final_loss']:.4f}; "
        f"plain LM loss {summary['final_lm_loss']:.4f}; answer-token loss "
        f"{summary['final_answer_loss']:.2e}",
        "",
        "## Measured accuracy",
        "",
        "Greedy decoding of 7 tokens, scored by `mesa_vllm.eval.data.score` (first integer",
        "equals the key).  The weights evaluated are the stored bfloat16 ones, computed in",
        "float32 (HF transformers forward, positions 0..n-1, no RoPE scaling: plain RoPE past",
        f"{L}).  `within L`: `passkey_sample` prompts with target lengths uniform up to {L}-8;",
        "`varied`: sentence-level filler, every length; `k x L`: `passkey_sample(tok, k*L)`,",
        "key depth uniform.  Depth bins: key position in fifths of the prompt, 0 = start.",
        "",
        "| prompts | tokens | correct | accuracy | by key depth (correct/n per fifth) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in summary["eval"]:
        if r["amp_bf16"]:
            continue
        tag = {"within": "within L", "varied": "varied, within L"}.get(
            r["kind"], f"{r.get('factor', 0):g} x L"
        )
        bins = " ".join(f"{c}/{n}" for c, n in r.get("by_depth_bin", [])) or "-"
        toks = (
            f"{r['min_tokens']}-{r['max_tokens']}"
            if r["min_tokens"] != r["max_tokens"]
            else str(r["min_tokens"])
        )
        lines.append(f"| {tag} | {toks} | {r['correct']}/{r['n']} | {r['acc']:.2f} | {bins} |")
    bf = [r for r in summary["eval"] if r["amp_bf16"]]
    if bf:
        same = all(
            x["correct"] == y["correct"]
            for x, y in zip([r for r in summary["eval"] if not r["amp_bf16"]], bf, strict=True)
        )
        lines += [
            "",
            "Computed in bfloat16 instead (as vLLM would): "
            + (
                "the same counts."
                if same
                else ", ".join(
                    f"{r['kind']} {r.get('factor', '')} {r['correct']}/{r['n']}" for r in bf
                )
            ),
        ]
    lines += [
        "",
        "## How it was made",
        "",
        "```",
        cmd,
        f"python training/train_passkey.py --export-from out/{name} --out "
        f"mesa_vllm/assets/models/{name}",
        "```",
        "",
        "Training ran on CUDA (bf16 autocast); GPU kernels are not bitwise deterministic, so a",
        "re-run gives a model of the same quality, not the same bytes.",
        "",
        f"Versions: torch {summary['versions']['torch']}, transformers "
        f"{summary['versions']['transformers']}.  `training_summary.json` holds every number "
        "above and the loss/accuracy curve.  `tests/unit/test_trained_models.py` re-checks",
        f"on CPU that 20 fresh prompts within {L} tokens are answered (>= 19/20).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="llama")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--export-from",
        type=Path,
        default=None,
        help="only re-save a trained checkpoint from this folder into --out "
        "(HF format + tokenizer + generation config), then exit",
    )
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--answer-weight", type=float, default=10.0)
    ap.add_argument("--p-exact", type=float, default=0.5)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--save-dtype", default="bfloat16")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-within", type=int, default=200, help="final samples within L")
    ap.add_argument("--eval-long", type=int, default=50, help="final samples per factor")
    ap.add_argument("--factors", default="1.5,2,4,8")
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument(
        "--time-budget",
        type=float,
        default=0,
        help="seconds for training; if the first 100 steps project past it, "
        "--steps is lowered (logged). 0 = off",
    )
    args = ap.parse_args(argv)
    if args.export_from is not None:
        export(args.export_from, args.out)
        return {}

    import torch
    import torch.nn.functional as F
    import transformers

    t_start = time.time()
    dev = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    amp = dev.type == "cuda"
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{args.arch} {time.time() - t_start:7.1f}s] {msg}", flush=True)

    tok = Tok()
    data = PasskeyData(tok)
    data.self_check()
    log(
        f"data ok: fixed={data.fixed} filler_block={data.per} torch={torch.__version__} "
        f"transformers={transformers.__version__} device={dev} "
        f"{torch.cuda.get_device_name() if dev.type == 'cuda' else ''}"
    )

    config = build_config(args.arch, args, tok)
    model = getattr(transformers, ARCHS[args.arch][1])(config).to(torch.float32).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{ARCHS[args.arch][1]} params={n_params} head_dim={args.hidden // args.heads}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=dev.type == "cuda",
    )

    rng = random.Random(args.seed)
    L = args.train_len
    steps = args.steps
    hist: list[tuple[float, float, float]] = []
    progress = []
    t_train = time.time()
    step = 0
    while step < steps:
        lr = lr_at(step, steps, args.lr, args.warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        x, w, a = make_batch(data, rng, args.batch, L, args.answer_weight, args.p_exact)
        x, w, a = x.to(dev, non_blocking=True), w.to(dev), a.to(dev)
        model.train()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=x).logits
        ce = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            x[:, 1:].reshape(-1),
            reduction="none",
        ).view(x.shape[0], -1)
        ww, aa = w[:, 1:], a[:, 1:]
        loss = (ce * ww).sum() / ww.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.log_every == 0 or step == steps or step == 1:
            real = (ww > 0).float()
            lm = ((ce * real).sum() / real.sum()).item()
            ans = ((ce * aa).sum() / aa.sum()).item()
            hist.append((loss.item(), lm, ans))
            el = time.time() - t_train
            log(
                f"step {step}/{steps} loss {hist[-1][0]:.4f} lm {lm:.4f} answer {ans:.4f} "
                f"lr {lr:.2e} {el / step * 1000:.1f} ms/step"
            )
            progress.append(
                {
                    "step": step,
                    "loss": hist[-1][0],
                    "lm_loss": lm,
                    "answer_loss": ans,
                    "lr": lr,
                    "elapsed_s": el,
                }
            )
        if step == 100 and args.time_budget > 0:
            per = (time.time() - t_train) / 100
            if per * steps > args.time_budget:
                new = max(200, int(args.time_budget / per))
                log(f"time budget: {per * 1000:.1f} ms/step, lowering --steps {steps} -> {new}")
                steps = new
        if step % args.eval_every == 0 and step < steps:
            model.eval()
            e1 = evaluate(
                model,
                tok,
                data,
                dev,
                kind="within",
                n=64,
                seed=10_000 + step,
                L=L,
                amp=amp,
                batch=args.eval_batch,
            )
            e2 = evaluate(
                model,
                tok,
                data,
                dev,
                kind="long",
                n=32,
                seed=20_000 + step,
                L=L,
                factor=2.0,
                amp=amp,
                batch=args.eval_batch,
            )
            log(
                f"eval step {step}: within-L acc {e1['acc']:.3f} ({e1['correct']}/{e1['n']}) "
                f"| 2xL acc {e2['acc']:.3f} ({e2['correct']}/{e2['n']})"
            )
            if not progress or progress[-1]["step"] != step:
                progress.append({"step": step})
            progress[-1].update(eval_within=e1["acc"], eval_2x=e2["acc"])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t_train
    log(f"trained {steps} steps in {train_s:.1f}s")

    sizes = save_model(model, config, out, args.save_dtype)
    # Evaluate exactly the saved weights: round to the storage dtype.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(getattr(torch, args.save_dtype)).float())
    model.eval()
    results = []
    for amp_e in [False, True] if dev.type == "cuda" else [False]:
        results.append(
            evaluate(
                model,
                tok,
                data,
                dev,
                kind="within",
                n=args.eval_within,
                seed=1_000_001,
                L=L,
                amp=amp_e,
                batch=args.eval_batch,
            )
        )
        results.append(
            evaluate(
                model,
                tok,
                data,
                dev,
                kind="varied",
                n=args.eval_within // 2,
                seed=1_000_002,
                L=L,
                amp=amp_e,
                batch=args.eval_batch,
            )
        )
        for f in [float(v) for v in args.factors.split(",") if v]:
            results.append(
                evaluate(
                    model,
                    tok,
                    data,
                    dev,
                    kind="long",
                    n=args.eval_long,
                    seed=1_000_003 + int(f * 100),
                    L=L,
                    factor=f,
                    amp=amp_e,
                    batch=max(1, args.eval_batch // max(1, int(f))),
                )
            )
    for r in results:
        tag = r["kind"] + (f" {r['factor']}xL" if "factor" in r else "")
        log(
            f"final {tag:10s} {'bf16' if r['amp_bf16'] else 'fp32'}: acc {r['acc']:.3f} "
            f"({r['correct']}/{r['n']}) tokens {r['min_tokens']}-{r['max_tokens']}"
            + (f" by depth bin {r['by_depth_bin']}" if "by_depth_bin" in r else "")
        )
    last = hist[-min(len(hist), 3) :]
    summary = {
        "arch": ARCHS[args.arch][1],
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "steps_run": steps,
        "command": "python training/train_passkey.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "params": n_params,
        "train_seconds": train_s,
        "total_seconds": time.time() - t_start,
        "final_loss": hist[-1][0],
        "final_lm_loss": hist[-1][1],
        "final_answer_loss": hist[-1][2],
        "final_loss_mean_last_logs": sum(h[0] for h in last) / len(last),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "files": sizes,
        "eval": results,
        "progress": progress,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
