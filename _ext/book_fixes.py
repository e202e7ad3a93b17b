"""A small Sphinx extension for the book.

sphinx-thebe registers its inline configuration script on every read of the
sources, and with Sphinx 7 the page ends up declaring ``const THEBE_JS_URL``
twice (once with filename None, once with ''), which the browser reports as an
uncaught SyntaxError. This drops duplicate scripts from each page before it is
written.
"""


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        key = (script.filename or None, tuple(sorted((k, str(v)) for k, v in script.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
