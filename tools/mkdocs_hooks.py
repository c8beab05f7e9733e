"""mkdocs hooks (mkdocs.yml `hooks:`).

A pipe inside a code span of a table cell must be escaped for GitHub (`A\\|B`), where Python-Markdown
keeps the backslash in the code: drop it there, so the site shows `A|B` as GitHub does (Python-Markdown
does not split a row at a pipe inside backticks).
"""

import re

CODE = re.compile(r"`[^`\n]*`")


def on_page_markdown(markdown, **kwargs):
    out, fenced = [], False
    for line in markdown.split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and line.lstrip().startswith("|"):
            line = CODE.sub(lambda m: m.group(0).replace("\\|", "|"), line)
        out.append(line)
    return "\n".join(out)
