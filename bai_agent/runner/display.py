"""
Rich output of the persistent interpreter (``query.py``; docs/protocol.md section 10):
the ``display()`` builtin, the expression results that have a rich representation, and
matplotlib figures.

A rich item is ``["html", TEXT]`` or ``["media", [MIME, DATA]]`` (``image/png`` as
base64 text, ``image/svg+xml`` as the SVG's text). It goes into the same ordered buffer
as stdout and stderr (``userio.Output.write_item``), after the user's writers have been
flushed, so it keeps its place among them; the buffer sends it as one frame of its own,
``\\x01`` + ``r`` + the item as UTF-8 JSON. An item whose JSON is over ``MAX_ITEM`` bytes
is not sent: a note on stderr says so.

matplotlib, pandas, numpy are never imported here: only modules user code imported are
looked at (in ``sys.modules``). ``matplotlib.pyplot`` is patched as soon as it is
imported (``PyplotHook``, a meta-path finder that reacts to that one name and costs a
string comparison per import otherwise): its ``show()`` then emits every open figure as
a PNG and closes it; figures still open at the end of a run are emitted the same way.

Imported by ``query.py`` from the runner directory and then hidden from user code.
Standard library only, Python 3.8+ (see ``__init__.py``).
"""

from __future__ import annotations

import builtins
import io
import sys

import jsoncodec

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing into the user's process
if TYPE_CHECKING:
    from typing import Any

#: The largest item (its UTF-8 JSON) sent: it must fit one frame (8 MiB) with its
#: envelope, between the interpreter and the runner and between the runner and the agent.
MAX_ITEM = 8 * 1024 * 1024 - 64 * 1024

PNG = "image/png"
SVG = "image/svg+xml"
PYPLOT = "matplotlib.pyplot"

_output: Any = None  # the userio.Output, set by install()
_shown: list = []  # the figures emitted during this run (not emitted again at its end)


# -- rich representations ------------------------------------------------------------------


def _call(obj, name):
    """``obj.name()``, or None when it has no such method or the method fails."""
    try:
        method = getattr(obj, name, None)
        if method is None or not callable(method):
            return None
        result = method()
    except Exception:
        return None
    if isinstance(result, tuple) and len(result) == 2:  # IPython's (data, metadata)
        result = result[0]
    return result


def _png_base64(data):
    """Base64 text of PNG ``data`` (bytes, or base64 text already); None if neither."""
    import binascii  # only here: nothing more than before at start-up

    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
    elif isinstance(data, str):
        try:
            data = binascii.a2b_base64(data.encode("ascii"))
        except (UnicodeEncodeError, binascii.Error, ValueError):
            return None
    else:
        return None
    if not data:
        return None
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _is_figure(obj):
    module = sys.modules.get("matplotlib.figure")
    figure_class = getattr(module, "Figure", None) if module is not None else None
    try:
        return isinstance(figure_class, type) and isinstance(obj, figure_class)
    except Exception:
        return False


def figure_item(figure):
    """A matplotlib figure as a PNG item; None if it cannot be drawn."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    data = _png_base64(buffer.getvalue())
    return None if data is None else ["media", [PNG, data]]


def rich_item(obj):
    """
    The rich item of ``obj``: a matplotlib figure's PNG, else its ``_repr_html_``,
    ``_repr_png_``, ``_repr_svg_`` (in that order; a method that raises or gives
    nothing usable is skipped); None when it has none.
    """
    if obj is None or isinstance(obj, type):  # a class has the methods, unbound
        return None
    if _is_figure(obj):
        try:
            item = figure_item(obj)
        except Exception as e:
            _note(f"cannot draw the figure: {type(e).__name__}: {e}")
            return None
        if item is not None:
            _shown.append(obj)
        return item
    html = _call(obj, "_repr_html_")
    if isinstance(html, str):
        return ["html", html]
    png = _png_base64(_call(obj, "_repr_png_"))
    if png is not None:
        return ["media", [PNG, png]]
    svg = _call(obj, "_repr_svg_")
    if isinstance(svg, bytes):
        svg = svg.decode("utf-8", "replace")
    if isinstance(svg, str):
        return ["media", [SVG, svg]]
    return None


def _note(text):
    try:
        sys.stderr.write(f"*** {text}\n")
    except Exception:
        pass


def _flush_user_streams():
    """The user's own writers (they may have replaced ours) empty their buffers first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def emit(item):
    """Send ``item`` in order with stdout and stderr; False when it was not sent."""
    payload = jsoncodec.dumps(item).encode("utf-8", "replace")
    if len(payload) > MAX_ITEM:
        kind = item[1][0] if item[0] == "media" else item[0]
        _note(f"{kind} output of {len(payload)} bytes not shown: the limit is {MAX_ITEM} bytes")
        return True  # the note stands for it
    _flush_user_streams()
    return bool(_output.write_item(payload))


def display(*objs, **options):
    """Show each object: its rich representation if it has one, else its repr on stdout."""
    check_pyplot()
    for obj in objs:
        item = rich_item(obj)
        if item is None or not emit(item):
            print(repr(obj))


def displayhook(value):
    """sys.displayhook: an expression result with a rich representation is shown as such."""
    if value is None:
        return
    check_pyplot()
    item = rich_item(value)
    if item is None or not emit(item):
        sys.__displayhook__(value)
        return
    builtins._ = value  # type: ignore[attr-defined]  # as the default hook does


# -- matplotlib ----------------------------------------------------------------------------------


def _figures(pyplot):
    return [pyplot.figure(number) for number in list(pyplot.get_fignums())]


def show_figures(pyplot, skip=()):
    """Emit each open figure of ``pyplot`` (but those in ``skip``) as a PNG, and close it."""
    for figure in _figures(pyplot):
        try:
            if not any(figure is other for other in skip):
                item = figure_item(figure)
                if item is not None:
                    emit(item)
        except Exception as e:
            _note(f"cannot draw figure {getattr(figure, 'number', '?')}: {type(e).__name__}: {e}")
        finally:
            try:
                pyplot.close(figure)
            except Exception:
                pass


def _patch(pyplot):
    # Known by the function itself, not a flag on the module: a reload of pyplot brings
    # its own show() back, and the next check patches it again.
    if getattr(getattr(pyplot, "show", None), "_bai_show", False):
        return

    def show(*args, **kwargs):
        show_figures(pyplot)

    show.__doc__ = "Show every open figure in the console (as PNG) and close it."
    show.__module__ = getattr(pyplot, "__name__", PYPLOT)
    show.__qualname__ = show.__name__ = "show"
    show._bai_show = True  # type: ignore[attr-defined]
    try:
        pyplot.show = show
    except Exception:
        pass


def check_pyplot():
    """Patch ``matplotlib.pyplot`` if user code has imported it (or put one in sys.modules)."""
    pyplot = sys.modules.get(PYPLOT)
    if pyplot is not None:
        _patch(pyplot)


def start_run():
    del _shown[:]
    check_pyplot()


def end_run():
    """Figures still open at the end of a run: shown once (but those already shown), closed."""
    try:
        pyplot = sys.modules.get(PYPLOT)
        if pyplot is not None:
            _patch(pyplot)
            if callable(getattr(pyplot, "get_fignums", None)):
                show_figures(pyplot, skip=_shown)
    except Exception as e:  # pyplot itself failed (user code may have broken it)
        _note(f"cannot show the open figures: {type(e).__name__}: {e}")
    finally:
        del _shown[:]


class PyplotHook:
    """
    A meta-path finder that only reacts to ``matplotlib.pyplot``: it finds the module
    with the finders behind it and patches it once loaded (then steps out of the way,
    leaving the module's spec and loader as they were).
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != PYPLOT:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec, loader)  # type: ignore[assignment]  # a loader by duck typing
        return spec

    def invalidate_caches(self):
        pass


class _PatchingLoader:
    def __init__(self, spec, loader):
        self._spec = spec
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._spec.loader = self._loader
        try:
            module.__loader__ = self._loader
        except Exception:
            pass
        self._loader.exec_module(module)
        _patch(module)


def install(output):
    """Hook into the user's process: ``display``, ``sys.displayhook``, the pyplot hook."""
    global _output
    _output = output
    builtins.display = display  # type: ignore[attr-defined]
    sys.displayhook = displayhook
    sys.meta_path.insert(0, PyplotHook())
