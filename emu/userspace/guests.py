"""Building and finding guests.

A guest is named on the command line as one of:
    a name from guest/           "hello"  -> guest/hello.S (or guest/NAME.c), built
    a path to assembler source   "my.S"   -> built
    a path to C source           "my.c"   -> compiled, built
    a path to an ELF             "a.out"  -> used as it is
``resolve(arg)`` turns any of these into the path of an ELF to load.

Guests are assembled with GNU as (`as --64 -I guest/lib`) and linked with
GNU ld (`ld -T guest/link.ld -nostdlib`) together with the runtime
(guest/lib/runtime.S).  C guests (guest/include/emu.h) are compiled with the
system's C compiler ($CC, else gcc, else clang; CFLAGS below) and linked the
same way, with guest/lib/cstart.S (their _start, which calls guest_main) in
front of the runtime, and the selftest library (guest/lib/*.c: ucalls,
formatting) after it.  Outputs go to build/guest/ for the guests of guest/,
and for any other source to the cache directory ($EMU_CACHE_DIR, default
~/.cache/emu: never inside the installed package); they are rebuilt when the
source, a header it includes, anything in guest/lib/ or guest/include/, or the
linker script is newer.  Files are written under a temporary name and renamed
into place, so that two builds running at once (make and a test, say) never
leave a half-written ELF.

    python -m emu.userspace.guests build      build every guest in guest/
    python -m emu.userspace.guests list       print the guest names
"""

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = REPO / "guest"
LIB_DIR = GUEST_DIR / "lib"
INCLUDE_DIR = GUEST_DIR / "include"
LINK_SCRIPT = GUEST_DIR / "link.ld"
RUNTIME_SRC = LIB_DIR / "runtime.S"
CSTART_SRC = LIB_DIR / "cstart.S"
# The selftest library (guest/include/emu.h's ucalls and formatting), linked into C guests.
LIB_C_SRCS = (LIB_DIR / "ucall_common.c", LIB_DIR / "guest_sprintf.c")
BUILD_DIR = REPO / "build" / "guest"


def cache_dir():
    """Where guests from outside guest/ are built: $EMU_CACHE_DIR, else ~/.cache/emu (under
    $XDG_CACHE_HOME when set).  Never inside the installed package."""
    env = os.environ.get("EMU_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "emu"


def build_dir_for(src):
    """build/guest/ of the repository for its own guests (guest/*), for any other the cache
    directory's guest/<checkout>/: a guest links this checkout's runtime, and two checkouts (two
    versions of emu, or a worktree) must not take each other's runtime objects or ELFs."""
    if Path(src).resolve().parent == GUEST_DIR:
        return BUILD_DIR
    return cache_dir() / "guest" / checkout_key()


def checkout_key():
    """The cache's name for this checkout: a hash of its path."""
    return hashlib.sha256(str(REPO.resolve()).encode()).hexdigest()[:8]


ASM_SUFFIXES = (".S", ".s")
C_SUFFIXES = (".c",)
SOURCE_SUFFIXES = ASM_SUFFIXES + C_SUFFIXES

# Kernel-style freestanding code: no libc, no PIC, no red zone (the runtime's
# calls and the VMM may use the stack below RSP), the kernel code model (every
# symbol address is a sign-extended 32-bit value; the image is linked at 1 MiB,
# which fits: README "Fidelity"), no stack protector (no TLS canary), no unwind
# tables (link.ld discards them).  -c only: emu links with ld and link.ld, so
# -static -nostdlib -no-pie have nothing to do.
CFLAGS = (
    "-std=gnu11",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mcmodel=kernel",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-common",
    "-O2",
    "-g0",
)
COMPILERS = ("gcc", "clang")

BINUTILS_MISSING = "GNU as/ld not found: guests are assembled with binutils; install it: apt-get install binutils"


class GuestError(Exception):
    """A guest that cannot be found or built; str() is the whole message."""


COMPILER_MISSING = "no C compiler found (gcc or clang): C guests are compiled with one; install it: apt-get install gcc"


class CompileError(GuestError):
    """The compiler refused a C guest: the message is one line, then the
    compiler's output as it printed it."""


def check_binutils():
    if shutil.which("as") is None or shutil.which("ld") is None:
        raise GuestError(BINUTILS_MISSING)


def find_compiler():
    """The C compiler to use, as an argv prefix: $CC when set (a command, with
    arguments if it has any), else gcc, else clang.  GuestError naming the
    package when there is none."""
    cc = shlex.split(os.environ.get("CC", ""))
    if cc:
        path = shutil.which(cc[0])
        if path is None:
            raise GuestError(f"the C compiler CC={cc[0]} was not found: unset CC or install it: apt-get install gcc")
        return [path] + cc[1:]
    for name in COMPILERS:
        path = shutil.which(name)
        if path:
            return [path]
    raise GuestError(COMPILER_MISSING)


def sources():
    """{name: source path} of the guests in guest/ (.S and .c files; a name
    with both is an error)."""
    if not GUEST_DIR.is_dir():
        return {}
    found = {}
    for p in sorted(GUEST_DIR.iterdir()):
        if p.suffix in SOURCE_SUFFIXES and p.is_file():
            if p.stem in found:
                raise GuestError(f"two guests called {p.stem!r}: {found[p.stem].name} and {p.name}")
            found[p.stem] = p
    return found


def names():
    """Sorted names of the guests in guest/ (their .S and .c files)."""
    return sorted(sources())


def _lib_inputs():
    """Files every build depends on: the include files, the runtime and the
    linker script."""
    libs = [p for p in LIB_DIR.iterdir() if p.is_file()] if LIB_DIR.is_dir() else []
    return sorted(libs) + [LINK_SCRIPT]


def _include_inputs():
    """The headers of guest/include/ (a C guest depends on them)."""
    return sorted(p for p in INCLUDE_DIR.iterdir() if p.is_file()) if INCLUDE_DIR.is_dir() else []


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
        lines = [
            ln.strip()
            for ln in (res.stderr or res.stdout).splitlines()
            if ln.strip() and not ln.rstrip().endswith("Assembler messages:")
        ]
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
    _replace_from_tmp(
        obj, lambda tmp: _run(["as", "--64", "-I", str(LIB_DIR), "-o", tmp, str(src)], f"assembling {src}")
    )


def _runtime_object(src=RUNTIME_SRC, build_dir=BUILD_DIR):
    """<build dir>/lib/runtime.o (a directory of its own, so that a guest
    called "runtime" cannot clash with it), assembled again when its sources
    changed.  The same for cstart.o (src=CSTART_SRC) and, compiled, for the
    selftest library's .c files (LIB_C_SRCS)."""
    obj = build_dir / "lib" / f"{src.stem}.o"
    if src.suffix in C_SUFFIXES:
        if _stale(obj, _lib_inputs() + _include_inputs()):
            _compile_lib(src, obj)
    elif _stale(obj, _lib_inputs()):
        _assemble(src, obj)
    return obj


def _compile_lib(src, obj):
    cc = find_compiler()
    _replace_from_tmp(
        obj, lambda tmp: _run([*cc, *CFLAGS, "-I", str(INCLUDE_DIR), "-c", "-o", tmp, str(src)], f"compiling {src}")
    )


def _source_name(src):
    """The name a C guest's __FILE__ says: relative to the repository for its
    own guests, else the absolute path."""
    try:
        return str(src.relative_to(REPO))
    except ValueError:
        return str(src)


def _compile(src, obj, dep):
    """Compile a C guest to obj; dep gets the headers it included (make syntax)."""
    cc = find_compiler()

    def produce(tmp):
        tmp_dep = tmp + ".d"
        argv = [
            *cc,
            *CFLAGS,
            "-I",
            str(INCLUDE_DIR),
            "-MD",
            "-MF",
            tmp_dep,
            "-MT",
            "obj",
            "-c",
            "-o",
            tmp,
            _source_name(src),
        ]
        try:
            try:
                res = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
            except FileNotFoundError:
                raise GuestError(COMPILER_MISSING) from None
            if res.returncode != 0:
                out = (res.stderr + res.stdout).rstrip("\n")
                raise CompileError(
                    f"compiling {_source_name(src)} failed ({Path(cc[0]).name} exit status {res.returncode}):\n{out}"
                )
            os.replace(tmp_dep, dep)
        finally:
            if os.path.exists(tmp_dep):
                os.unlink(tmp_dep)

    _replace_from_tmp(obj, produce)


def _c_dependencies(dep):
    """The files a compiled C guest read, from its -MD file; [] when unknown."""
    try:
        text = dep.read_text()
    except OSError:
        return []
    words = text.replace("\\\n", " ").split(":", 1)[-1].split()
    return [REPO / w if not os.path.isabs(w) else Path(w) for w in words]


def elf_path_for(src_path):
    """Where build() puts the ELF for a source: build/guest/<stem>.elf for a
    guest of guest/, <cache dir>/guest/ext-<stem>-<hash>.elf for any other (the
    hash of its absolute path keeps two foo.S from different places apart;
    the cache directory is $EMU_CACHE_DIR, default ~/.cache/emu)."""
    src = Path(src_path).resolve()
    if src.parent == GUEST_DIR:
        return BUILD_DIR / f"{src.stem}.elf"
    digest = hashlib.sha256(str(src).encode()).hexdigest()[:8]
    return build_dir_for(src) / f"ext-{src.stem}-{digest}.elf"


def build(src_path):
    """Assemble (or compile) and link one guest source; return the path of its
    ELF.  Does nothing when the ELF is newer than everything it is made from."""
    src = Path(src_path).resolve()
    if not src.is_file():
        raise GuestError(f"{src_path}: no such file")
    check_binutils()
    is_c = src.suffix in C_SUFFIXES
    if is_c:
        find_compiler()
    if not LINK_SCRIPT.is_file() or not RUNTIME_SRC.is_file():
        raise GuestError(f"the guest runtime is missing: expected {RUNTIME_SRC} and {LINK_SCRIPT}")
    bdir = build_dir_for(src)
    runtime = _runtime_object(build_dir=bdir)
    objs = [runtime]
    elf = elf_path_for(src)
    inputs = [src, runtime] + _lib_inputs()
    if is_c:
        objs = [_runtime_object(CSTART_SRC, bdir), runtime] + [_runtime_object(c, bdir) for c in LIB_C_SRCS]
        dep = elf.with_suffix(".d")
        inputs += objs + _include_inputs() + _c_dependencies(dep)
    if not _stale(elf, inputs) and (not is_c or dep.is_file()):
        if not is_c and not _defines_start(elf):
            raise _no_start(src_path)
        return elf
    obj = elf.with_suffix(".o")
    if is_c:
        _compile(src, obj, dep)
    else:
        _assemble(src, obj)
    if not is_c and not _defines_start(obj):
        raise _no_start(src_path)
    _replace_from_tmp(
        elf,
        lambda tmp: _run(
            ["ld", "-T", str(LINK_SCRIPT), "-nostdlib", "-o", tmp, str(obj), *map(str, objs)], f"linking {src}"
        ),
    )
    return elf


def _no_start(src_path):
    return GuestError(
        f"{src_path}: no _start: a guest's code begins at the global label _start "
        f"(.globl _start, then _start: on its first instruction)"
    )


def _defines_start(obj):
    """The assembled guest (or its ELF) defines a global _start (else ld would warn, link anyway
    and start it at the beginning of .text: in the runtime)."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    with open(obj, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        if not isinstance(symtab, SymbolTableSection):
            return False
        return any(
            s.name == "_start" and s["st_shndx"] != "SHN_UNDEF" and s["st_info"]["bind"] != "STB_LOCAL"
            for s in symtab.iter_symbols()
        )


def _is_elf(path):
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def resolve(arg):
    """The ELF to run for a guest argument: a guest name, a .S path or an
    ELF path (see the module docstring)."""
    arg = str(arg)
    path = Path(arg)
    looks_like_path = os.sep in arg or path.suffix != ""
    if not looks_like_path:
        src = sources().get(arg)
        if src is not None:
            return build(src)
    if path.is_file():
        try:
            if _is_elf(path):
                return path
        except OSError as e:
            raise GuestError(f"{arg}: cannot read: {e.strerror or e}") from None
        if path.suffix in SOURCE_SUFFIXES:
            return build(path)
        raise GuestError(f"{arg} is not an ELF file, assembler source (.S) or C source (.c)")
    if path.exists():
        raise GuestError(f"{arg} is not a file")
    if looks_like_path:
        raise GuestError(f"{arg}: no such file")
    available = ", ".join(names()) or "(none)"
    raise GuestError(f"unknown guest {arg!r}; the guests are: {available} (or give the path of a .S, .c or ELF file)")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m emu.userspace.guests", description="Build or list the guests in guest/."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build every guest (only what changed)")
    sub.add_parser("list", help="print the guest names")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "list":
            for name in names():
                print(name)
            return 0
        for name, src in sorted(sources().items()):
            elf = build(src)
            print(f"{name:12s} {os.path.relpath(elf, Path.cwd())}")
        return 0
    except GuestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
