"""``python -m napari_sam2``: the ``napari-sam2`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
