"""Tiny real transformers models with small trained tokenizers of different vocabularies, built in
process from a config with random weights (no downloads). Used by the logic tests."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Gemma3TextConfig,
    Gemma3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ensemble.members import Member

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "What is two plus two? Two plus two is four. Three times three is nine.",
    "Answer yes or no. Is fire hot? Yes, fire is hot. Is ice hot? No.",
    "Once upon a time there was a small cat who lived in a big house near the river.",
    "Café, naïve, résumé, 東京, 日本語, emoji 🙂 and newlines\nare text too.\n\n",
    "def add(a, b):\n    return a + b\n",
    "Paris Rome Berlin Madrid London Tokyo cat dog house river tree sun moon star",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bpe_tokenizer(vocab_size: int = 320, chat: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style pieces, Ġ for space), with a chat template."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>" if chat else "<|endoftext|>", pad_token="<|endoftext|>",
        bos_token=None,
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def sp_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE (▁ for space, <0xNN> byte fallback), BOS added, no chat template."""
    specials = ["<pad>", "<bos>", "<eos>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=specials[:3])
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([])  # keep byte pieces as ordinary vocabulary entries
    vocab = tok.get_vocab()
    missing = [s for s in specials[3:] if s not in vocab]
    if missing:  # byte-fallback pieces must be in the vocabulary
        model = tok.model
        merges = []
        new_vocab = dict(vocab)
        for s in missing:
            new_vocab[s] = len(new_vocab)
        tok.model = models.BPE(vocab=new_vocab, merges=merges or _merges(tok), byte_fallback=True)
        del model
    from tokenizers import processors

    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def _merges(tok: Tokenizer) -> list[tuple[str, str]]:
    import json

    data = json.loads(tok.to_str())
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]


def tiny_llama(tokenizer, seed: int = 0, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen(tokenizer, seed: int = 1, hidden: int = 48) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gemma(tokenizer, seed: int = 2, hidden: int = 64) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        sliding_window=64, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return Gemma3ForCausalLM(cfg).eval()


def sharpen(model, scale: float = 8.0):
    """Scale the LM head so the random model has peaked distributions (like a real LM)."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


def member_bpe(seed: int = 0, name: str = "tiny-bpe") -> Member:
    tok = bpe_tokenizer()
    return Member(sharpen(tiny_llama(tok, seed=seed)), tok, name=name)


def member_bpe_qwen(seed: int = 1, name: str = "tiny-bpe-qwen") -> Member:
    tok = bpe_tokenizer(vocab_size=380)
    return Member(sharpen(tiny_qwen(tok, seed=seed)), tok, name=name)


def member_sp(seed: int = 2, name: str = "tiny-sp") -> Member:
    tok = sp_tokenizer()
    return Member(sharpen(tiny_gemma(tok, seed=seed)), tok, name=name)
