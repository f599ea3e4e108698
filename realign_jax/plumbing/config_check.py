"""Types of configured values, checked before any compute.

gin passes a binding's value on as written: `TRAIN_STEPS='ten'` or
`SFT.batch_size='8'` reach the code as strings and used to fail deep inside
it with a traceback. `check_config` (a configured object such as an Algorithm
or TrainerConfig, and the dataclasses in its fields) and `check_args` (a
binary's keyword arguments) check every value whose annotation is a plain
type (int, float, bool, str, or an Optional / Union of them) and raise one
UserError naming the setting and the value. Other annotations are not checked.
"""

import dataclasses
import inspect
import numbers
import os
import types
import typing
from typing import Any, Callable, Optional, Union

from realign_jax.plumbing import paths
from realign_jax.plumbing.errors import UserError

_NAMES = {int: "an integer", float: "a number", bool: "True or False", str: "a string"}


def _expected(annotation) -> Optional[tuple]:
  """(allowed plain types, None allowed), or None when `annotation` is not a plain type."""
  if annotation in _NAMES:
    return (annotation,), False
  if typing.get_origin(annotation) in (Union, types.UnionType):
    args = typing.get_args(annotation)
    plain = tuple(a for a in args if a is not type(None))
    if plain and all(a in _NAMES for a in plain):
      return plain, len(plain) < len(args)
  return None


def _matches(value, t) -> bool:
  if t is bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"
  if isinstance(value, bool):  # NOTE: bool is an int, but True is no batch size
    return False
  if t is int:
    return isinstance(value, numbers.Integral)
  if t is float:
    return isinstance(value, numbers.Real)
  return isinstance(value, t)


def check_value(name: str, value: Any, annotation: Any) -> None:
  """Raises UserError unless `value` fits `annotation` (unchecked when not a plain type)."""
  expected = _expected(annotation)
  if expected is None:
    return
  allowed, optional = expected
  if (value is None and optional) or any(_matches(value, t) for t in allowed):
    return
  want = " or ".join(_NAMES[t] for t in allowed) + (" or None" if optional else "")
  hint = ""
  if isinstance(value, str) and str not in allowed:
    hint = "; in gin a string is quoted, a number or True/False is not"
  raise UserError(f"{name} must be {want}, got {value!r} (type {type(value).__name__}){hint}")


def _hints(obj) -> dict:
  try:
    return typing.get_type_hints(obj)
  except Exception:  # NOTE: an unresolvable forward reference: check nothing
    return {}


def check_config(obj: Any, name: Optional[str] = None) -> None:
  """Checks the plain-typed fields of a dataclass instance and of the dataclasses in its fields.

  Settings are named `Class.field`, as gin binds them (`SFT.batch_size`).
  """
  seen = set()

  def walk(o, label):
    if not dataclasses.is_dataclass(o) or isinstance(o, type) or id(o) in seen:
      return
    seen.add(id(o))
    hints = _hints(type(o))
    for field in dataclasses.fields(o):
      value = getattr(o, field.name, None)
      if field.init and field.name in hints:
        check_value(f"{label}.{field.name}", value, hints[field.name])
      _walk_value(value, walk)

  walk(obj, name or type(obj).__name__)


def _walk_value(value, walk) -> None:
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    walk(value, type(value).__name__)
  elif isinstance(value, (list, tuple)):
    for item in value:
      if dataclasses.is_dataclass(item) and not isinstance(item, type):
        walk(item, type(item).__name__)


def check_args(fn: Callable, values: dict, name: Optional[str] = None) -> None:
  """Checks a call's keyword arguments against `fn`'s annotations (`name.arg` in errors),
  and the dataclasses among them with `check_config`."""
  name = name or fn.__name__
  hints = _hints(fn)
  for param in inspect.signature(fn).parameters:
    if param not in values:
      continue
    value = values[param]
    if param in hints:
      check_value(f"{name}.{param}", value, hints[param])
    _walk_value(value, lambda o, label: check_config(o, label))


def check_output_file(output_file: str) -> None:
  """Refuses, before any compute, an output file that could not be written at the end."""
  if not output_file:
    raise UserError("OUTPUT_FILE is empty")
  if paths.is_remote(output_file):
    # NOTE: an object store has no directories to check (an object is written
    # under any prefix), nor a writability test short of writing.
    if paths.isdir(output_file):
      raise UserError(f"OUTPUT_FILE {output_file} is a directory; name a file")
    return
  if os.path.isdir(output_file):
    raise UserError(f"OUTPUT_FILE {output_file} is a directory; name a file")
  out_dir = os.path.dirname(os.path.abspath(output_file))
  if not os.path.isdir(out_dir):
    raise UserError(f"output directory {out_dir} does not exist")
  if not os.access(out_dir, os.W_OK | os.X_OK):
    raise UserError(f"output directory {out_dir} is not writable")
