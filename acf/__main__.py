"""``python -m acf``: the ``acf`` command. An interrupt (Ctrl-C) at any point, the imports included,
ends it with one line and exit code 130 (the package itself guards its own imports the same way)."""
import sys

try:
    from .cli import main
except KeyboardInterrupt:
    print("acf: interrupted (while starting)", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
