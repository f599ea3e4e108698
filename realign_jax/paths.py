"""Where the package's configs live: the bottom floor, so that any package may ask.

`REPO_ROOT` holds configs/ and gin/: the checkout, else the installed package
(the wheel ships them inside it).
"""

import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _config_root() -> str:
  """The directory holding configs/ and gin/: the checkout, else the installed package."""
  checkout = os.path.dirname(PACKAGE_DIR)
  if os.path.isdir(os.path.join(checkout, "gin", "models")):
    return checkout
  if os.path.isdir(os.path.join(PACKAGE_DIR, "gin", "models")):
    return PACKAGE_DIR
  return checkout


REPO_ROOT = _config_root()
