"""Prompts: read (a task's split or a JSONL file), rendered (chat template) and encoded.

`PromptSource` names where the prompts come from and how they are encoded;
`load_prompts` gives (vocab, prompt texts, [N, input_length] ids) with the
vocabulary checked against the model that decodes them.
"""

import dataclasses
import logging
from typing import Optional, Sequence

import numpy as np

from realign_jax.plumbing import paths
from realign_jax.data import chat as chat_lib
from realign_jax.data import jsonl, pipeline
from realign_jax.data import vocab as vocab_lib
from realign_jax.plumbing.errors import UserError


@dataclasses.dataclass(frozen=True)
class PromptSource:
  """The prompts to decode and their encoding.

  Attributes:
    task: the task whose split's `inputs` are the prompts (without `prompt_file`).
    split: that split.
    prompt_file: JSONL with a non-empty string `prompt` per line, instead of a task.
    data_dir: the task's data directory.
    vocab_path: the vocabulary (None: the built-in one).
    max_prompts: the first this many prompts (None: all).
    input_length: prompt length in ids (longer prompts are cut, chat prompts refused).
    chat_template: render each prompt with the vocabulary's chat template
      (tokenizer_config.json beside `vocab_path`) as one user message.
  """
  task: str = "builtin_summarize"
  split: str = "validation"
  prompt_file: Optional[str] = None
  data_dir: Optional[str] = None
  vocab_path: Optional[str] = None
  max_prompts: Optional[int] = 64
  input_length: int = 96
  chat_template: bool = False


def read_prompt_file(path: str) -> list:
  """JSONL with a non-empty string `prompt` per line."""
  if not paths.isfile(path):
    raise UserError(f"prompt file {path} not found")
  prompts = []
  for i, row in jsonl.iter_json_lines(path):
    p = row.get("prompt") if isinstance(row, dict) else None
    if not isinstance(p, str) or not p.strip():
      raise UserError(f"{path} row {i}: missing or empty 'prompt' field")
    prompts.append(p)
  if not prompts:
    raise UserError(f"prompt file {path} holds no prompts")
  return prompts


def encode_prompts(vocab, prompts: Sequence[str], input_length: int, *,
                   chat: bool = False) -> np.ndarray:
  """[N, input_length] ids (`pipeline.fit_prompts` with the vocabulary's special ids).

  Over-long prompts are truncated (kept: the beginning), with a warning; an
  over-long chat prompt is refused (its end is the generation prompt).
  """
  tokens = vocab_lib.special_tokens(vocab)
  ids = vocab_lib.encode_many(vocab, list(prompts))
  if chat:
    for i, x in enumerate(ids):
      if len(x) > input_length:
        raise UserError(f"prompt {i} is {len(x)} tokens after the chat template, more than "
                        f"decode.input_length={input_length}; raise input_length")
    return pipeline.fit_prompts(ids, input_length, tokens, add_bos=False)
  too_long = sum(len(x) > input_length - 1 for x in ids)
  if too_long:
    logging.warning("%d of %d prompts are longer than input_length - 1 = %d tokens and were "
                    "truncated to their first %d tokens", too_long, len(ids), input_length - 1,
                    input_length - 1)
  return pipeline.fit_prompts(ids, input_length, tokens)


def load_prompts(source: PromptSource, ref_cfg, ref_checkpoint: str = "") -> tuple:
  """(vocab, prompts, inputs [N, input_length]) with the vocabulary checked against the model.

  With `source.chat_template` the prompts are the rendered chat texts.
  """
  if not isinstance(source.chat_template, bool):
    raise UserError(f"decode.chat_template must be True or False, got {source.chat_template!r}")
  if source.chat_template:
    chat_lib.load_template(source.vocab_path)  # NOTE: a missing template is refused before reading
  vocab = vocab_lib.load_vocabulary(source.vocab_path)
  vocab_lib.check_model_tokens(vocab, ref_cfg, f"the model {ref_checkpoint}".rstrip())
  if source.prompt_file:
    prompts = read_prompt_file(source.prompt_file)
  else:
    prompts = [e["inputs"] for e in pipeline.text_examples(source.task, source.split,
                                                           data_dir=source.data_dir)]
    if not prompts:
      raise UserError(f"task {source.task} split {source.split} holds no examples")
  if source.max_prompts:
    prompts = prompts[:source.max_prompts]
  if source.chat_template:
    prompts = chat_lib.render_prompts(source.vocab_path, prompts)
  return vocab, prompts, encode_prompts(vocab, prompts, source.input_length,
                                        chat=source.chat_template)
