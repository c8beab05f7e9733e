"""Every `--json` output of the CLI that the tests produce is checked against its schema in
docs/schema/ (docs/json.md says what each field means).

tests/conftest.py installs ``hooked()`` for the whole session, so no test has to remember:
- a subprocess ``python -m emu run|explore|campaign ... --json`` (``subprocess.run``, or a Popen
  whose output is read with ``communicate()``): its stdout is validated when it ends;
- an in-process ``emu.cli.main([..., "--json"])``: its output is validated before it is written.

A test that wants the check explicitly calls ``validate_output(argv, stdout, returncode)``.
"""

import contextlib
import functools
import io
import json
import sys
from pathlib import Path

import jsonschema

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schema"
COMMANDS = ("run", "explore", "campaign")


@functools.lru_cache(maxsize=None)
def validator(name):
    """The validator of docs/schema/NAME.schema.json (the schema itself checked first)."""
    schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_name(args):
    """The schema an emu command line's --json output follows (``args`` as given to
    ``emu.cli.main``: the subcommand first), or None when it prints no JSON object."""
    args = [str(a) for a in args]
    if not args or args[0] not in COMMANDS or "--json" not in args or {"-h", "--help"} & set(args):
        return None
    if args[0] == "explore" and any(a == "--replay" or a.startswith("--replay=") for a in args):
        return "replay"
    return args[0]


def emu_args(argv):
    """The emu arguments of a process's argv (``python -m emu ARGS...``), or None when the
    process is not the emu CLI."""
    if isinstance(argv, (str, bytes)) or argv is None:
        return None
    argv = [str(a) for a in argv]
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] == "emu":
            return argv[i + 2 :]
    return None


def validate_output(args, stdout, returncode=None):
    """Check what ``emu ARGS`` printed on stdout: exactly one JSON object that its schema accepts.
    An empty stdout is allowed only when the command did not end with status 0 or 1 (bad input
    prints nothing).  Raises AssertionError saying what is wrong."""
    name = schema_name(args)
    if name is None:
        return None
    if isinstance(stdout, bytes):
        stdout = stdout.decode("utf-8", "replace")
    if not (stdout or "").strip():
        assert returncode not in (0, 1), (
            f"`emu {' '.join(map(str, args))}` exited {returncode} and printed no JSON object"
        )
        return None
    try:
        obj = json.loads(stdout)
    except ValueError as e:
        raise AssertionError(
            f"`emu {' '.join(map(str, args))}`: stdout is not one JSON object ({e}): {stdout[:300]!r}"
        ) from None
    errors = sorted(validator(name).iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        where = lambda e: "/".join(map(str, e.absolute_path)) or "(the object)"
        raise AssertionError(
            f"`emu {' '.join(map(str, args))}`: the output does not follow docs/schema/{name}.schema.json: "
            + "; ".join(f"{where(e)}: {e.message}" for e in errors[:5])
        )
    return obj


@contextlib.contextmanager
def hooked():
    """Validate every --json output of the emu CLI made while inside."""
    import subprocess
    import emu.cli

    communicate = subprocess.Popen.communicate
    main = emu.cli.main

    @functools.wraps(communicate)
    def checked_communicate(self, *a, **kw):
        out, err = communicate(self, *a, **kw)
        args = emu_args(self.args)
        if args is not None and out is not None:
            validate_output(args, out, self.returncode)
        return out, err

    @functools.wraps(main)
    def checked_main(argv=None, out=None):
        args = sys.argv[1:] if argv is None else list(argv)
        if schema_name(args) is None:
            return main(argv, out)
        buf = io.StringIO()
        status = main(argv, buf)
        validate_output(args, buf.getvalue(), status)
        (out or sys.stdout).write(buf.getvalue())
        return status

    subprocess.Popen.communicate = checked_communicate
    emu.cli.main = checked_main
    try:
        yield
    finally:
        subprocess.Popen.communicate = communicate
        emu.cli.main = main
