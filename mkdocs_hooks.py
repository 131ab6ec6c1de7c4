"""MkDocs hooks of the documentation site (mkdocs.yml, ``hooks:``).

The front page is README.md (:func:`on_page_markdown`). The docstrings are written in reStructuredText's inline style (``:func:`name```,
a paragraph ending in ``::`` before an indented block), which mkdocstrings renders
as Markdown: the roles would show as literal ``:func:`` text before the code and
the ``::`` as two colons. :func:`on_page_content` drops the role names and the doubled colon from
the rendered API pages, leaving the code spans."""

import re
from pathlib import Path

ROLE = re.compile(r":(?:func|mod|class|meth|attr|data|exc|obj):(?=<code>)")
LITERAL_COLONS = re.compile(r"::(?=</p>)")


def on_page_content(html, page, config, files):
    if not page.file.src_uri.startswith("api/"):
        return html
    return LITERAL_COLONS.sub(":", ROLE.sub("", html))


def on_page_markdown(markdown, page, config, files):
    """The front page (docs/index.md) is README.md, its links into docs/ made relative to
    the site, so the two never drift apart."""
    if page.file.src_uri != "index.md":
        return markdown
    readme = Path(config["config_file_path"]).parent / "README.md"
    text = readme.read_text(encoding="utf-8")
    return re.sub(r"\]\(docs/", "](", text)
