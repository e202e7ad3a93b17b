"""A small Sphinx extension for the book.

The book is built from the outputs committed in the notebooks
(``execute_notebooks: "off"`` in _config.yml). Setting ``LORA_LAB_EXECUTE=1``
in the environment (``make book EXECUTE=1``) executes them instead, with
results cached in the build folder; "0" or unset keeps the configured mode.
jupyter-book 1 has no command-line option to override one setting, and a
second, edited copy of _config.yml would have to repeat every path in it.
"""

import os

EXECUTE_VAR = "LORA_LAB_EXECUTE"


def _execution_mode(app, config):
    value = os.environ.get(EXECUTE_VAR, "").strip()
    if value in ("", "0"):
        return
    if value != "1":
        raise ValueError(
            f"{EXECUTE_VAR}={value!r}: use 1 (execute, cached) or 0 (committed outputs)"
        )
    # read by myst-nb at builder-inited, after this
    config.nb_execution_mode = "cache"


def setup(app):
    app.connect("config-inited", _execution_mode)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
