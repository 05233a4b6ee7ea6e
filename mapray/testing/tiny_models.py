"""Tiny random models built in seconds, offline: for tests and CPU smoke runs.

A byte-level BPE tokenizer (BOS prepended, ChatML template) trained on in-memory text, plus Llama causal-LM
and sequence-classification checkpoints small enough to build at test time. Shapes respect vLLM's CPU backend
(attention head size >= 32). Run as a script to write them to a folder:
`python -m mapray.testing.tiny_models OUT_DIR`.
"""

from __future__ import annotations

import sys
from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

_WORDS = """the a an is was of to and in that it for on with as by at from this be are or have not but what how why
when who which you your we they he she cook oven steak water fire pen joke help answer question please thanks sorry
yes no maybe good bad better worse human assistant user system first second third step heat salt minutes hours rare
medium well done about more less very"""


def _corpus(n: int = 400) -> list[str]:
    import random

    rng = random.Random(0)
    lines = []
    words_list = _WORDS.split()
    for i in range(n):
        words = [rng.choice(words_list) for _ in range(rng.randint(3, 25))]
        if i % 5 == 0:
            words.append(str(rng.randint(0, 10_000)))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":"]))
    lines.append("Human: Assistant: user assistant system \n\n 0123456789 ÄÖÜ é 日本 🙂")
    return lines


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>", additional_special_tokens=["<|im_start|>", "</s>"])
    fast.chat_template = CHATML
    return fast


def build_tiny_models(out: str | Path, seed: int = 0, layers: int = 2) -> dict[str, str]:
    """Writes policy/, reference/ (another seed) and reward/ checkpoints; returns their paths."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    out = Path(out)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    paths = {}
    builders = {"policy": (LlamaForCausalLM, seed), "reference": (LlamaForCausalLM, seed + 1),
                "reward": (LlamaForSequenceClassification, seed + 2)}
    for name, (cls, s) in builders.items():
        torch.manual_seed(s)
        cfg = config.to_dict()
        if cls is LlamaForSequenceClassification:
            cfg.update(num_labels=1, id2label={0: "LABEL_0"}, label2id={"LABEL_0": 0})
        model = cls(LlamaConfig(**cfg)).eval()
        with torch.no_grad():  # larger head weights so rewards and log-probs vary visibly between rows
            for p in model.parameters():
                p.mul_(4.0) if p.dim() == 2 else None
        path = out / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = str(path)
    return paths


if __name__ == "__main__":
    print(build_tiny_models(sys.argv[1] if len(sys.argv) > 1 else "tiny-models"))


def perturbed_copy(checkpoint: str | Path, out: str | Path, scale: float = 0.9) -> str:
    """A new checkpoint of `checkpoint`'s model with every weight scaled by `scale` (and its tokenizer): what a
    training step leaves, a new identity whose log-probs differ from the old one's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)
    return str(out)


def reward_head_variant(checkpoint: str | Path, out: str | Path, labels: int | None = None, negate: bool = False,
                        seed: int = 0) -> str:
    """A reward checkpoint with `checkpoint`'s body and another head: its head negated (a model that prefers
    exactly what the first one rejects), or a new head of `labels` labels (a multi-objective reward model, its
    weights drawn with `seed`)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        if labels is not None:
            torch.manual_seed(seed)
            hidden = model.score.in_features
            model.score = torch.nn.Linear(hidden, labels, bias=False)
            model.score.weight.normal_(0.0, 4.0 / hidden ** 0.5)
            model.config.num_labels = labels
            model.config.id2label = {i: f"objective_{i}" for i in range(labels)}
            model.config.label2id = {f"objective_{i}": i for i in range(labels)}
        if negate:
            model.score.weight.neg_()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)
    return str(out)
