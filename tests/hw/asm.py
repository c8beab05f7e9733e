"""Assemble Intel-syntax x86-64 snippets with GNU as/ld into flat bytes.

``assemble(src, base)`` returns the machine code of ``src`` linked at ``base``
(so absolute addresses and labels are right).  Results are cached per (src, base).
"""

import functools
import os
import subprocess
import tempfile


@functools.lru_cache(maxsize=None)
def assemble(src, base=0):
    with tempfile.TemporaryDirectory() as d:
        s, o, b = (os.path.join(d, n) for n in ("g.s", "g.o", "g.bin"))
        with open(s, "w") as f:
            f.write(".intel_syntax noprefix\n.code64\n.text\n" + src + "\n")
        subprocess.run(["as", "--64", "-o", o, s], check=True, capture_output=True, text=True)
        subprocess.run(
            ["ld", "-m", "elf_x86_64", f"-Ttext={base:#x}", "--oformat", "binary", "-e", f"{base:#x}", "-o", b, o],
            check=True,
            capture_output=True,
            text=True,
        )
        with open(b, "rb") as f:
            return f.read()
