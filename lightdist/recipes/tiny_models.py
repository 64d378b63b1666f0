"""python -m lightdist.recipes.tiny_models {encoder,causal-lm} DIR

Make a tiny randomly initialised Hugging Face model directory locally, to try a recipe without a download.

Both models get a tokenizer trained here, in about a second, with the ``tokenizers`` library on the
built-in standard-library docstring corpus (:func:`lightdist.recipes._text_data.corpus`), wrapped as a
transformers fast tokenizer. ``save_pretrained`` writes a complete directory (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``) that
``AutoModel*.from_pretrained(DIR, local_files_only=True)`` and ``AutoTokenizer`` load:

- ``encoder``: a BERT encoder (``BertModel``: hidden size 32, 2 layers, 2 heads) with a lower-casing
  WordPiece tokenizer (``[CLS] ... [SEP]``), for the ``text_classification`` configs;
- ``causal-lm``: a Llama decoder (``LlamaForCausalLM``: hidden size 32, 2 layers) with a byte-level
  BPE tokenizer (``<|endoftext|>`` is BOS, EOS and padding), for the ``lora_causal_lm`` configs::

      python -m lightdist.recipes.tiny_models causal-lm runs/tiny-causal-lm
      lightdist fit --config lora_causal_lm/cpu

The weights are random: these models learn the corpus a little in a few steps, which is what the
tests and a first try need, and nothing more.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["make_tiny_causal_lm", "make_tiny_encoder"]


def _train_wordpiece(vocab_size: int) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from lightdist.recipes._text_data import corpus

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tok


def _train_byte_bpe(vocab_size: int) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lightdist.recipes._text_data import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The full byte alphabet: any text encodes, even characters the corpus never shows.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


def make_tiny_encoder(
    path: str | Path,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    vocab_size: int = 2000,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Write a tiny random BERT encoder and its WordPiece tokenizer to ``path``; returns ``path``."""
    import torch
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path = Path(path)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=_train_wordpiece(vocab_size),
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_positions,
    )
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)  # model.safetensors: the default since transformers 4.35
    tokenizer.save_pretrained(path)
    return path


def make_tiny_causal_lm(
    path: str | Path,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 2000,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Write a tiny random Llama causal LM and its byte-level BPE tokenizer to ``path``; returns ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    eos = "<|endoftext|>"
    raw = _train_byte_bpe(vocab_size)
    eos_id = raw.token_to_id(eos)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=raw, bos_token=eos, eos_token=eos, pad_token=eos, model_max_length=max_positions
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_positions,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=True,
        # Wider than the usual 0.02: with 32 dimensions that would cap every logit near 0.6, so the
        # frozen (tied) output layer could not express a peaked distribution and LoRA would barely
        # move the loss.
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)  # model.safetensors: the default since transformers 4.35
    tokenizer.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m lightdist.recipes.tiny_models {encoder,causal-lm} DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m lightdist.recipes.tiny_models", description=__doc__.splitlines()[2]
    )
    parser.add_argument("kind", choices=("encoder", "causal-lm"))
    parser.add_argument("dir", help="directory to write (created; files in it are replaced)")
    parser.add_argument("--hidden-size", type=int, default=32, help="width (a larger random base for benchmarks)")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--heads", type=int, help="attention heads, dividing --hidden-size (2 encoder, 4 causal-lm)")
    args = parser.parse_args(argv)
    heads = args.heads or (2 if args.kind == "encoder" else 4)
    if args.hidden_size <= 0 or args.layers <= 0 or heads <= 0 or args.hidden_size % heads:
        parser.error("--hidden-size, --layers and --heads must be positive, and --heads must divide --hidden-size")
    make = make_tiny_encoder if args.kind == "encoder" else make_tiny_causal_lm
    out = make(args.dir, hidden_size=args.hidden_size, num_layers=args.layers, num_heads=heads)
    print(f"wrote a tiny random {args.kind} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
