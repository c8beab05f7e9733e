"""Building and finding guests.

A guest is named on the command line as one of:
    a name from guest/           "hello"  -> guest/hello.S, built
    a path to assembler source   "my.S"   -> built
    a path to an ELF             "a.out"  -> used as it is
``resolve(arg)`` turns any of these into the path of an ELF to load.

Guests are assembled with GNU as (`as --64 -I guest/lib`) and linked with
GNU ld (`ld -T guest/link.ld -nostdlib`) together with the runtime
(guest/lib/runtime.S).  Outputs go to build/guest/ and are rebuilt when the
source or anything in guest/lib/ or the linker script is newer.  Files are
written under a temporary name and renamed into place, so that two builds
running at once (make and a test, say) never leave a half-written ELF.

    python -m emu.guests build      build every guest in guest/
    python -m emu.guests list       print the guest names
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = REPO / "guest"
LIB_DIR = GUEST_DIR / "lib"
LINK_SCRIPT = GUEST_DIR / "link.ld"
RUNTIME_SRC = LIB_DIR / "runtime.S"
BUILD_DIR = REPO / "build" / "guest"

SOURCE_SUFFIXES = (".S", ".s")

BINUTILS_MISSING = ("GNU as/ld not found: guests are assembled with binutils; "
                    "install it: apt-get install binutils")


class GuestError(Exception):
    """A guest that cannot be found or built; str() is the whole message."""


def check_binutils():
    if shutil.which("as") is None or shutil.which("ld") is None:
        raise GuestError(BINUTILS_MISSING)


def names():
    """Sorted names of the guests in guest/ (their .S files)."""
    if not GUEST_DIR.is_dir():
        return []
    return sorted(p.stem for p in GUEST_DIR.iterdir()
                  if p.suffix in SOURCE_SUFFIXES and p.is_file())


def _lib_inputs():
    """Files every build depends on: the include files, the runtime and the
    linker script."""
    libs = [p for p in LIB_DIR.iterdir() if p.is_file()] if LIB_DIR.is_dir() else []
    return sorted(libs) + [LINK_SCRIPT]


def _mtime(path):
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _stale(target, inputs):
    """True when target is missing or not newer than some input (an equal
    time counts as stale: on a coarse clock it cannot be told apart)."""
    t = _mtime(target)
    if t is None:
        return True
    return any((_mtime(p) or 0) >= t for p in inputs)


def _run(argv, what):
    try:
        res = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise GuestError(BINUTILS_MISSING) from None
    if res.returncode != 0:
        # Keep the tool's own words but on one line: drop as's
        # "x.S: Assembler messages:" header and join the rest.
        lines = [ln.strip() for ln in (res.stderr or res.stdout).splitlines()
                 if ln.strip() and not ln.rstrip().endswith("Assembler messages:")]
        detail = "; ".join(lines) or f"exit status {res.returncode}"
        raise GuestError(f"{what} failed: {detail}")


def _replace_from_tmp(final, produce):
    """Call produce(tmp_path), then rename tmp_path to final."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    os.close(fd)
    try:
        produce(tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _assemble(src, obj):
    _replace_from_tmp(obj, lambda tmp: _run(
        ["as", "--64", "-I", str(LIB_DIR), "-o", tmp, str(src)], f"assembling {src}"))


def _runtime_object():
    """build/guest/lib/runtime.o (a directory of its own, so that a guest
    called "runtime" cannot clash with it), assembled again when its sources
    changed."""
    obj = BUILD_DIR / "lib" / "runtime.o"
    if _stale(obj, _lib_inputs()):
        _assemble(RUNTIME_SRC, obj)
    return obj


def elf_path_for(src_path):
    """Where build() puts the ELF for a source: build/guest/<stem>.elf for a
    guest of guest/, build/guest/ext-<stem>-<hash>.elf for any other (the
    hash of its absolute path keeps two foo.S from different places apart)."""
    src = Path(src_path).resolve()
    if src.parent == GUEST_DIR:
        return BUILD_DIR / f"{src.stem}.elf"
    digest = hashlib.sha256(str(src).encode()).hexdigest()[:8]
    return BUILD_DIR / f"ext-{src.stem}-{digest}.elf"


def build(src_path):
    """Assemble and link one guest source; return the path of its ELF.
    Does nothing when the ELF is newer than everything it is made from."""
    src = Path(src_path).resolve()
    if not src.is_file():
        raise GuestError(f"{src_path}: no such file")
    check_binutils()
    if not LINK_SCRIPT.is_file() or not RUNTIME_SRC.is_file():
        raise GuestError(f"the guest runtime is missing: expected {RUNTIME_SRC} and {LINK_SCRIPT}")
    runtime = _runtime_object()
    elf = elf_path_for(src)
    if not _stale(elf, [src, runtime] + _lib_inputs()):
        return elf
    obj = elf.with_suffix(".o")
    _assemble(src, obj)
    _replace_from_tmp(elf, lambda tmp: _run(
        ["ld", "-T", str(LINK_SCRIPT), "-nostdlib", "-o", tmp, str(obj), str(runtime)],
        f"linking {src}"))
    return elf


def _is_elf(path):
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def resolve(arg):
    """The ELF to run for a guest argument: a guest name, a .S path or an
    ELF path (see the module docstring)."""
    arg = str(arg)
    path = Path(arg)
    looks_like_path = os.sep in arg or path.suffix != ""
    if not looks_like_path and arg in names():
        return build(GUEST_DIR / f"{arg}.S")
    if path.is_file():
        try:
            if _is_elf(path):
                return path
        except OSError as e:
            raise GuestError(f"{arg}: cannot read: {e.strerror or e}") from None
        if path.suffix in SOURCE_SUFFIXES:
            return build(path)
        raise GuestError(f"{arg} is not an ELF file or assembler source (.S)")
    if path.exists():
        raise GuestError(f"{arg} is not a file")
    if looks_like_path:
        raise GuestError(f"{arg}: no such file")
    available = ", ".join(names()) or "(none)"
    raise GuestError(f"unknown guest {arg!r}; the guests are: {available} "
                     f"(or give the path of a .S or ELF file)")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m emu.guests",
                                     description="Build or list the guests in guest/.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build every guest (only what changed)")
    sub.add_parser("list", help="print the guest names")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "list":
            for name in names():
                print(name)
            return 0
        for name in names():
            elf = build(GUEST_DIR / f"{name}.S")
            print(f"{name:12s} {os.path.relpath(elf, Path.cwd())}")
        return 0
    except GuestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
