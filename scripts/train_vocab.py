"""Trains the built-in sentencepiece vocabulary on the built-in corpus.

A unigram model with 2048 pieces (small, so tiny models are fast) and T5/seqio
ids: pad=0, eos=1, unk=2, no bos. Byte fallback keeps every character
encodable, and identity normalisation keeps decode(encode(text)) == text for
whitespace-normalised text. Training reads the documents and summaries of the
train split only, in file order, on one thread, so the model is deterministic.

Run from the repository root, after `scripts/build_builtin_corpus.py`:

  python scripts/train_vocab.py
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import pathlib
import sys

import sentencepiece as spm

BUILTIN_DIR = pathlib.Path(__file__).resolve().parent.parent / (
    "realign_jax/data/builtin")


def train_sentences(corpus_path: pathlib.Path) -> list[str]:
  """The documents and summaries of the train split, in file order."""
  sentences = []
  with gzip.open(corpus_path, "rt", encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      sentences.append(row["document"])
      sentences.append(row["summary"])
  return sentences


def train(sentences: list[str], vocab_size: int) -> bytes:
  """Trains the unigram model and returns its serialized proto."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_writer=model,
      model_type="unigram",
      vocab_size=vocab_size,
      pad_id=0,
      eos_id=1,
      unk_id=2,
      bos_id=-1,
      pad_piece="<pad>",
      eos_piece="</s>",
      unk_piece="<unk>",
      byte_fallback=True,
      character_coverage=0.9995,
      normalization_rule_name="identity",
      split_digits=True,
      max_sentence_length=16384,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      num_threads=1,
      minloglevel=2,
  )
  return model.getvalue()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--corpus", default=str(
      BUILTIN_DIR / "corpus_train.jsonl.gz"))
  parser.add_argument("--output", default=str(BUILTIN_DIR / "vocab.model"))
  parser.add_argument("--vocab_size", type=int, default=2048)
  args = parser.parse_args()
  sentences = train_sentences(pathlib.Path(args.corpus))
  proto = train(sentences, args.vocab_size)
  tmp = args.output + ".tmp"
  with open(tmp, "wb") as f:
    f.write(proto)
  os.replace(tmp, args.output)
  print(f"wrote {args.output}: {args.vocab_size} pieces from "
        f"{len(sentences)} sentences", file=sys.stderr)


if __name__ == "__main__":
  main()
