"""MkDocs hooks of the documentation site (mkdocs.yml, ``hooks:``).

The docstrings are written in reStructuredText's inline style (``:func:`name```,
a paragraph ending in ``::`` before an indented block), which mkdocstrings renders
as Markdown: the roles would show as literal ``:func:`` text before the code and
the ``::`` as two colons. This hook drops the role names and the doubled colon from
the rendered API pages, leaving the code spans."""

import re

ROLE = re.compile(r":(?:func|mod|class|meth|attr|data|exc|obj):(?=<code>)")
LITERAL_COLONS = re.compile(r"::(?=</p>)")


def on_page_content(html, page, config, files):
    if not page.file.src_uri.startswith("api/"):
        return html
    return LITERAL_COLONS.sub(":", ROLE.sub("", html))
