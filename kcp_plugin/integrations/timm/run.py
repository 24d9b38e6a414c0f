"""Run one of timm's scripts with the ``kcp_pruned`` entrypoint registered.

timm's ``train.py`` imports extra modules with ``--device-modules``; ``validate.py`` (and
``inference.py``, ``benchmark.py``) have no such option, so ``--model kcp_pruned`` is unknown
there. This runner imports :mod:`kcp_plugin.integrations.timm` (registering the entrypoint)
and then runs the script as ``__main__`` with the remaining arguments, unchanged::

    python -m kcp_plugin.integrations.timm.run validate.py /data/imagenet --model kcp_pruned \\
        --model-kwargs base=resnet50 --checkpoint output/train/.../model_best.pth.tar
"""

from __future__ import annotations

import os
import runpy
import sys

import kcp_plugin.integrations.timm  # noqa: F401  (registers the kcp_pruned entrypoint)

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Run ``argv[0]`` (a script path) as ``__main__`` with ``argv[1:]`` as its arguments.

    Raises:
        SystemExit: no script given (code 2), or the script's own exit.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not os.path.isfile(argv[0]):
        what = f"{argv[0]!r} is not a file" if argv else "no script given"
        print(f"usage: python -m kcp_plugin.integrations.timm.run SCRIPT.py [ARGS...] ({what}); "
              "SCRIPT is one of timm's scripts, e.g. validate.py from pytorch-image-models",
              file=sys.stderr)
        raise SystemExit(2)
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python SCRIPT` would
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
