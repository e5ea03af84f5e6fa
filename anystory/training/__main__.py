"""``python -m anystory.training --config ...``: every stage in order (see :mod:`anystory.training.runner`)."""
import sys

from .runner import run_stages

if __name__ == "__main__":
    sys.exit(run_stages())
