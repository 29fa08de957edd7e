"""The project's tokenizer: byte-level BPE (512 tokens, digits split one per token).

Built once by ``python -m mesa_vllm.testing.tokenizer`` from a fixed corpus and committed under
``mesa_vllm/assets/tokenizer``; every model the project makes (random-weight test models and the
trained passkey models) copies those files.  Byte-level, so any text round-trips.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS_SENTENCES = [
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there.",
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "The pass key is 71432. Remember it. 71432 is the pass key.",
    "What is the pass key? The pass key is",
    "The special magic number is 90210. What is the special magic number?",
    "<|user|>\nHello, who are you?\n<|assistant|>\nI am a small test model.\n",
    "The quick brown fox jumps over the lazy dog. A needle hides in a haystack of words.",
]


def _corpus() -> list[str]:
    lines = []
    for i in range(200):
        for s in _CORPUS_SENTENCES:
            lines.append(s.replace("71432", str(10000 + 37 * i)))
    return lines


def build_tokenizer(out_dir: Path = TOKENIZER_DIR) -> Path:
    """Train the BPE on the fixed corpus and write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def copy_tokenizer(model_dir: Path) -> None:
    """Copy the committed tokenizer files into a model directory."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, model_dir / name)


def special_token_ids() -> dict[str, int]:
    """bos/eos/pad ids of the committed tokenizer."""
    data = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in data["added_tokens"]}
    return {"bos": ids["<s>"], "eos": ids["</s>"], "pad": ids["<pad>"]}


if __name__ == "__main__":
    print(build_tokenizer())
