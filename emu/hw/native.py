"""The compiled hardware MMU (emu/hw/mmu.c): built with the C compiler, loaded if it can be.

``mmu`` is the extension module ``emu.hw._mmu``, or None: then every walk and fill runs the
Python model (emu/hw/ept.py, emu/hw/paging.py, emu.hw.vcpu), which is the reference either
way.  None when ``EMU_PURE_PYTHON=1`` is set, and where there is no C compiler (or no Python
headers): one line on stderr says so, and everything works, slower.

The module is compiled on first use (``make`` does it ahead: ``python -m emu.hw.native build``)
into build/native/ of the source tree (or ~/.cache/emu/native when that is not writable),
under a name that carries a hash of the source, the compiler flags and the Python ABI, so a
changed source is never loaded stale.  The file is written under a temporary name and renamed
into place: two processes building at once never load half a file.

    python -m emu.hw.native build     build it (if stale) and print its path
"""

import hashlib
import importlib.machinery
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("mmu.c")
CFLAGS = ("-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-Wall", "-Wno-unused-variable")
MODULE = "emu.hw._mmu"

mmu = None  # the extension module, once loaded
why_not = None  # why it is not (a line for the user), or None


def pure_python_requested():
    return os.environ.get("EMU_PURE_PYTHON", "") not in ("", "0")


def _compiler():
    cc = shlex.split(os.environ.get("CC", ""))
    if cc:
        path = shutil.which(cc[0])
        return [path] + cc[1:] if path else None
    for name in ("gcc", "clang", "cc"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def _build_dirs():
    yield Path(__file__).resolve().parents[2] / "build" / "native"
    yield Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emu" / "native"


def target_name():
    h = hashlib.sha256()
    h.update(SOURCE.read_bytes())
    h.update(" ".join(CFLAGS).encode())
    h.update(sys.version.encode())
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return f"_mmu-{h.hexdigest()[:16]}{suffix}"


class BuildError(Exception):
    pass


def build():
    """The path of the built module (compiled now if it is not there yet); BuildError if it cannot be."""
    name = target_name()
    for d in _build_dirs():
        if (d / name).exists():
            return d / name
    cc = _compiler()
    if cc is None:
        raise BuildError("no C compiler found (gcc or clang): install one (apt-get install gcc)")
    include = sysconfig.get_paths().get("include")
    if not include or not (Path(include) / "Python.h").exists():
        raise BuildError(
            f"the Python headers are missing (no Python.h in {include}): "
            f"install them (Debian/Ubuntu: apt-get install python3-dev)"
        )
    errors = []
    for d in _build_dirs():
        target = d / name
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=d)
            os.close(fd)
        except OSError as e:
            errors.append(f"{d}: {e.strerror}")
            continue
        try:
            res = subprocess.run(
                cc + list(CFLAGS) + ["-I", include, "-o", tmp, str(SOURCE)], capture_output=True, text=True
            )
            if res.returncode != 0:
                detail = "; ".join(ln.strip() for ln in (res.stderr or res.stdout).splitlines() if ln.strip())
                raise BuildError(f"compiling {SOURCE.name} failed: {detail[:400]}")
            os.replace(tmp, target)
            for old in d.glob("_mmu-*"):  # builds of older sources (a loaded one may go too)
                if old != target:
                    try:
                        old.unlink()
                    except OSError:
                        pass
            return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise BuildError("no writable build directory: " + "; ".join(errors))


def _load(path):
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[MODULE] = module
    return module


def load(ept, walk_py):
    """Load (building if needed) and set up the module; None, having said why on stderr once,
    where it cannot be.  Called by emu.hw.ept as its import ends (emu.hw.paging then gives it its
    classes); this module imports neither."""
    global mmu, why_not
    if mmu is not None or why_not is not None:
        return mmu
    if pure_python_requested():
        why_not = "EMU_PURE_PYTHON is set"
        return None
    try:
        module = _load(build())
        module.setup(ept, walk_py)
    except (BuildError, ImportError, OSError) as e:
        why_not = str(e)
        print(f"emu: the hardware MMU runs in pure Python (slower): {why_not}", file=sys.stderr)
        return None
    mmu = module
    return mmu


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m emu.hw.native", description="Build the compiled hardware MMU.")
    ap.add_argument("cmd", choices=("build",))
    ap.parse_args(argv)
    if pure_python_requested():
        print("EMU_PURE_PYTHON is set: nothing to build")
        return 0
    try:
        print(os.path.relpath(build(), Path.cwd()))
    except BuildError as e:
        # Not an error for make: runs fall back to the Python walkers, and say so.
        print(f"emu: the hardware MMU runs in pure Python (slower): {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
