"""Small fixes to the Jupyter Book 1 site that its configuration cannot express."""
from __future__ import annotations

from typing import Any


def drop_duplicate_scripts(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    """Keep the first of identical <script> entries.

    sphinx-thebe and sphinx-togglebutton add inline scripts after the HTML builder started; Sphinx 7
    then lists each twice (once with filename None, once with ''), and the second copy of
    sphinx-thebe's `const THEBE_JS_URL = ...` is a SyntaxError in every page's console.
    """
    seen, unique = set(), []
    for script in context.get("script_files", []):
        attributes = getattr(script, "attributes", {})
        key = (getattr(script, "filename", script) or "", tuple(sorted((k, str(v)) for k, v in attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app: Any) -> dict:
    app.connect("html-page-context", drop_duplicate_scripts, priority=900)  # after the themes add theirs
    return {"parallel_read_safe": True, "parallel_write_safe": True}
