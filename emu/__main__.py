import sys

try:
    from .cli import main
except ImportError as e:  # a dependency of the wrong version: one line, no traceback
    print(f"emu: error: {e}", file=sys.stderr)
    sys.exit(2)

sys.exit(main())
