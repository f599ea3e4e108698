"""A grid of DeRa lambdas: the one type, and its one validator, of every lambda list.

DeRa's decode method (`DeRa.lambdas`), the evaluation's selection of decode
groups (`evaluate.lambdas`) and the studies' grids all check their lambdas
here: a non-empty list of distinct finite numbers, kept in the order given.
A caller whose lambdas stand for a KL weight beta / lambda bounds them below
(`minimum`): lambda >= 0 where lambda = 0 is the reference itself, > 0 where
every lambda is retrained. Errors are one line and name the setting (`what`,
e.g. the gin parameter).
"""

import dataclasses
import numbers
from typing import Iterable, Iterator, Optional

from realign_jax.plumbing.errors import UserError


@dataclasses.dataclass(frozen=True)
class LambdaGrid:
  """Distinct finite lambdas, in the order given (build it with `LambdaGrid.of`)."""
  values: tuple

  @classmethod
  def of(cls, values: Iterable[float], what: str = "lambda grid", *,
         minimum: Optional[float] = None, inclusive: bool = True,
         why: str = "") -> "LambdaGrid":
    """The grid of `values`, else a one-line UserError naming `what`.

    Args:
      values: the lambdas (a list or tuple of real numbers).
      what: the setting's name in messages, e.g. 'DeRa.lambdas'.
      minimum: a lower bound, >= it (`inclusive`) or > it; None: no bound.
      why: appended to the bound's message (what the bound stands for).
    """
    if isinstance(values, LambdaGrid):
      values = values.values
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
      raise UserError(f"{what} must be a list of numbers, got {values!r}")
    out = []
    for lam in values:
      # NOTE: numbers.Real holds numpy's scalars too; bool is an int, but not a lambda.
      if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not (
          abs(float(lam)) < float("inf")):
        raise UserError(f"{what} holds a non-finite or non-numeric value: {lam!r}")
      out.append(float(lam))
    if not out:
      raise UserError(f"{what} is empty")
    dup = sorted({x for x in out if out.count(x) > 1})
    if dup:
      raise UserError(f"{what} has duplicates: {dup}")
    if minimum is not None:
      low = [x for x in out if x < minimum or (not inclusive and x == minimum)]
      if low:
        raise UserError(f"{what} must all be {'>=' if inclusive else '>'} {minimum:g}"
                        f"{' (' + why + ')' if why else ''}, got {out}")
    return cls(tuple(out))

  def __iter__(self) -> Iterator[float]:
    return iter(self.values)

  def __len__(self) -> int:
    return len(self.values)

  def __getitem__(self, i):
    return self.values[i]

  def __contains__(self, lam) -> bool:
    return lam in self.values

  def index(self, lam: float) -> int:
    return self.values.index(lam)

  def list(self) -> list:
    """The lambdas as a list of floats (as stage settings and results.json record them)."""
    return list(self.values)
