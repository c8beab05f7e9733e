"""Check the links of README.md, the root's *.md and docs/**/*.md: every relative link names a file
that exists, and every #anchor names a heading of its target (GitHub's anchors, which mkdocs' agree
with for the headings these pages use).  External links (http:, https:, mailto:) are not fetched.

    python tools/check_links.py [FILE.md ...]

Exit status 0 when every link resolves; 1 with one line per broken link (file:line: link: why).
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# [text](target) and [text](target "title"), not images' ![..](..) differently: both are checked.
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
EXTERNAL = ("http://", "https://", "mailto:", "ftp://")


def default_files():
    files = sorted(ROOT.glob("*.md")) + sorted((ROOT / "docs").rglob("*.md"))
    return [f for f in files if f.is_file()]


def github_slug(text):
    """The anchor GitHub gives a heading: markup dropped, lowercase, punctuation but '-' and '_'
    removed, each space a '-'."""
    text = re.sub(r"`([^`]*)`", r"\1", text)  # code spans keep their text
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def mkdocs_slug(text):
    """The anchor Python-Markdown's toc extension (mkdocs) gives a heading."""
    text = re.sub(r"`([^`]*)`", r"\1", text)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def lines_outside_code(path):
    """(line number, line) of the file, fenced code blocks and inline code left out."""
    fenced = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, re.sub(r"`[^`]*`", "``", line)


_ANCHORS = {}


def anchors(path, _cache=_ANCHORS):
    """The anchors of a Markdown file's headings as GitHub makes them and as mkdocs does
    (duplicates numbered -1, -2, ... in both)."""
    if path not in _cache:
        sets = []
        for slugify in (github_slug, mkdocs_slug):
            seen, found = {}, set()
            fenced = False
            for line in path.read_text(encoding="utf-8").splitlines():
                if FENCE.match(line):
                    fenced = not fenced
                    continue
                m = None if fenced else HEADING.match(line)
                if m:
                    slug = slugify(m.group(2))
                    k = seen.get(slug, 0)
                    seen[slug] = k + 1
                    found.add(slug if k == 0 else f"{slug}_{k}" if slugify is mkdocs_slug else f"{slug}-{k}")
            sets.append(found)
        _cache[path] = tuple(sets)
    return _cache[path]


def check_file(path):
    problems = []
    for n, line in lines_outside_code(path):
        for target in LINK.findall(line):
            if target.startswith(EXTERNAL):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}:{n}: {target}"
            if file_part and not dest.exists():
                problems.append(f"{where}: no such file")
                continue
            if anchor and dest.suffix == ".md":
                on_github, in_mkdocs = anchors(dest)
                in_site = DOCS in dest.parents
                if anchor not in on_github and anchor not in in_mkdocs:
                    problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
                elif anchor not in on_github or (in_site and anchor not in in_mkdocs):
                    problems.append(
                        f"{where}: the heading's anchor differs between GitHub and mkdocs "
                        f"(punctuation): reword the heading"
                    )
            elif anchor:
                problems.append(f"{where}: an anchor into a file that is not Markdown")
    return problems


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    files = [Path(a).resolve() for a in argv] or default_files()
    problems = [p for f in files for p in check_file(f)]
    for p in problems:
        print(p)
    nlinks = sum(len(LINK.findall(line)) for f in files for _, line in lines_outside_code(f))
    print(f"check_links: {len(files)} files, {nlinks} links, {len(problems)} broken")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
