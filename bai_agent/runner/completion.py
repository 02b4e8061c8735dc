"""
Completion of the dotted name at the end of a line, from the live namespace of the
persistent interpreter (``query.py``, the ``complete`` message).

``rlcompleter`` would do, but minimal images (Debian's ``python3-minimal``) do not have
it; this one also never calls anything: it only looks names and attributes up.

Imported by ``query.py`` from the runner directory and then hidden from user code (see
there). Standard library only, Python 3.8+ (see ``__init__.py``).
"""

from __future__ import annotations

import builtins
import keyword
import re

#: At most this many completions are returned.
MAX_COMPLETIONS = 1000

_TRAILING_NAME = re.compile(r"((?:[^\W\d]\w*\.)*)(\w*)$")


def complete(namespace: dict, text: str) -> list:
    """
    Completions of the dotted name at the end of ``text`` (``"print(os.pa"`` ->
    ``["os.pardir", "os.path", "os.pathsep"]``): global names, builtins and keywords, or
    attributes of an object reached through plain names and attributes (nothing is
    called). Names starting with ``_`` only when the text starts them too.
    """
    match = _TRAILING_NAME.search(text)
    assert match is not None  # the pattern matches the empty string at the end
    prefix, partial = match.groups()
    if not prefix and not partial:
        return []
    if prefix:
        parts = prefix[:-1].split(".")
        if parts[0] in namespace:
            obj = namespace[parts[0]]
        elif hasattr(builtins, parts[0]):
            obj = getattr(builtins, parts[0])
        else:
            return []
        for part in parts[1:]:
            obj = getattr(obj, part)
        names = set(dir(obj))
        if hasattr(obj, "__class__"):
            names.add("__class__")
    else:
        names = set(keyword.kwlist) | set(namespace) | set(dir(builtins))
    if not partial:
        hidden = "_"
    elif partial == "_":
        hidden = "__"
    else:
        hidden = None
    items = sorted(
        prefix + name
        for name in names
        if isinstance(name, str) and name.startswith(partial) and not (hidden and name.startswith(hidden))
    )
    return items[:MAX_COMPLETIONS]
