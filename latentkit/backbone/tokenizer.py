"""A small byte-level BPE tokenizer built locally (no hub access), with the ChatML/Qwen special tokens."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

PAD_TOKEN = "<|endoftext|>"
QWEN_SPECIAL_TOKENS = (
    PAD_TOKEN,
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Text the merges are learned from: chat scaffolding and the words of the built-in synthetic tasks.
_CORPUS = [
    "system user assistant You are a helpful assistant.",
    "What is the colour of the object at row 1, column 2? What is the shape of the object at row 3, column 4?",
    "Put the final answer in \\boxed{}. The answer is \\boxed{red}. Answer with the option's letter.",
    "The object at row 2, column 3 is small. Let me zoom in. It is a red triangle. It is a blue circle.",
    "red green blue yellow purple orange circle square triangle (A) (B) (C) (D) A. B. C. D.",
    "Options: left right up down start goal hole safe plan step move grid board yes no",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 + - * / = apples costs total each more less than how many",
    "the a an of to in is it that this and so we look closer observation think reason first then next finally",
]


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE on the fixed corpus and wrap it for transformers.

    Normalizer and pre-tokenizer are Qwen2's: `AutoTokenizer` loads a saved qwen2 model's tokenizer as
    `Qwen2Tokenizer`, which rebuilds them from its own code, so only these tokenize the same after a round trip.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token="<|im_end|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )
