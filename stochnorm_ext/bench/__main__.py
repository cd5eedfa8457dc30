"""``python -m stochnorm_ext.bench``: see the package docstring."""
import sys

from stochnorm_ext.bench.cli import main

sys.exit(main())
