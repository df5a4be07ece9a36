"""Vocabulary facts shared by the tokenizer, the model and the configs (torch-free)."""

SPECIAL_TOKENS = [
    "<|bos|>",              # starts every document; documents are delimited by it
    "<|user_start|>",       # the rest structure conversations (chat fine-tuning) ...
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",     # ... and tool use: the assistant writes python between these,
    "<|python_end|>",
    "<|output_start|>",     # and the tool's output comes back between these
    "<|output_end|>",
]
BOS_TOKEN = "<|bos|>"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, plus the special tokens

# The embedding tables are padded to a multiple of this: tensor-core friendly, and shards evenly across ranks.
VOCAB_PAD_MULTIPLE = 64


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    return -(-vocab_size // multiple) * multiple
