"""Chat templates: a prompt as one user message, rendered as a chat model expects it.

Chat models (Zephyr, Llama-2-chat, Mistral-instruct) are trained on text laid
out by a Jinja template that Hugging Face stores as `chat_template` in
`tokenizer_config.json` (a string, or a list of named templates of which
"default" is used; newer releases may keep it in `chat_template.jinja`
beside it). `render_prompts` renders each prompt as

  messages = [{"role": "user", "content": prompt}], add_generation_prompt=True

with the tokenizer's special tokens (`bos_token`, `eos_token`, ...) as
template variables, in a sandboxed Jinja environment with the settings
transformers uses (`trim_blocks`, `lstrip_blocks`, `raise_exception`), so
the text is the one `tokenizer.apply_chat_template(..., tokenize=False)`
gives. The rendered text is the whole prompt: special tokens written in it
(`</s>`, `<s>`) become their ids when it is encoded, and no BOS is added (the
template says where it goes; `pipeline.fit_prompts(add_bos=False)`).
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

from realign_jax.data import jsonl
from realign_jax.plumbing.errors import UserError

TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"


def _directory(vocab_path: str | None) -> str:
  if vocab_path is None:
    raise UserError("the built-in vocabulary has no chat template: give decode.vocab_path the "
                    "chat model's tokenizer (its tokenizer.json, or the directory holding it)")
  path = os.path.abspath(os.path.expanduser(os.fspath(vocab_path)))
  return path if os.path.isdir(path) else os.path.dirname(path)


def _content(value) -> str | None:
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=8)
def load_template(vocab_path: str | None) -> tuple[str, str, dict]:
  """(template source, the file it came from, special-token variables) of a tokenizer.

  Raises:
    UserError: no tokenizer_config.json, unreadable, or no chat template in it
      (nor in chat_template.jinja beside it).
  """
  directory = _directory(vocab_path)
  config_path = os.path.join(directory, TOKENIZER_CONFIG)
  if not os.path.isfile(config_path):
    raise UserError(f"no {TOKENIZER_CONFIG} beside the tokenizer {vocab_path}: {config_path} "
                    "(the chat template lives there)")
  doc = jsonl.read_json_object(config_path)
  variables = {name: _content(doc.get(name)) or "" for name in
               ("bos_token", "eos_token", "unk_token", "pad_token")}
  template = doc.get("chat_template")
  where = config_path
  if isinstance(template, list):  # several named templates: the default one
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  if template is None and os.path.isfile(os.path.join(directory, TEMPLATE_FILE)):
    where = os.path.join(directory, TEMPLATE_FILE)
    try:
      with open(where, encoding="utf-8") as f:
        template = f.read()
    except OSError as e:
      raise UserError(f"cannot read {where}: {e.strerror}") from None
  if not isinstance(template, str) or not template.strip():
    raise UserError(f"{config_path} has no chat_template (a Jinja string): this tokenizer is "
                    "not a chat model's; turn decode.chat_template off")
  return template, where, variables


def _environment():
  import jinja2
  from jinja2 import sandbox

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  return env


def render_prompts(vocab_path: str | None, prompts: Sequence[str]) -> list[str]:
  """Each prompt as one user message with the generation prompt, rendered by the template.

  Raises:
    UserError: one line naming the template's file when it does not compile
      or render (or renders an empty string).
  """
  source, where, variables = load_template(vocab_path)
  import jinja2
  try:
    template = _environment().from_string(source)
  except jinja2.exceptions.TemplateError as e:
    raise UserError(f"{where}: the chat template does not compile: "
                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
  out = []
  for i, prompt in enumerate(prompts):
    try:
      text = template.render(messages=[{"role": "user", "content": prompt}],
                             add_generation_prompt=True, **variables)
    except Exception as e:  # NOTE: a template can fail in any way (TypeError, UndefinedError)
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise UserError(f"{where}: the chat template does not render prompt {i}: {msg}") from None
    if not text.strip():
      raise UserError(f"{where}: the chat template renders prompt {i} as an empty string")
    out.append(text)
  return out
