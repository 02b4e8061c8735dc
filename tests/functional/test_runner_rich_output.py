"""
Rich output of the real runner in query mode (docs/protocol.md section 10), on the host's
Python: ``display()``, expression results with ``_repr_html_``/``_repr_png_``/
``_repr_svg_``, their order among stdout and stderr, the size bound, and the matplotlib
hooks against a stand-in ``matplotlib`` package (the host has no matplotlib; the real
one is tried on the sci image in ``test_rich_output_real.py``).
"""

import base64
import os
import textwrap

import pytest

from tests.functional.runner_process import USER_GID, USER_UID, Client

pytestmark = pytest.mark.functional

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))

CLASSES = textwrap.dedent(
    """
    class Html:
        def _repr_html_(self):
            return "<b>html</b>"
    class Png:
        def _repr_png_(self):
            return PNG
    class Svg:
        def _repr_svg_(self):
            return "<svg/>"
    class All(Html, Png, Svg):
        pass
    class PngSvg(Png, Svg):
        pass
    class Raising(Png):
        def _repr_html_(self):
            raise RuntimeError("no html today")
    class NoneHtml(Svg):
        def _repr_html_(self):
            return None
    class Plain:
        def __repr__(self):
            return "<plain>"
    """
)


@pytest.fixture
def client(runner):
    c = Client(runner.socket_path)
    assert c.run(f"PNG = {PNG!r}\n" + CLASSES).exit_code == 0
    yield c
    c.close()


def console(result):
    """The run's messages as console entries, consecutive output of a stream joined."""
    entries = []
    for message in result.messages:
        if message["type"] == "output":
            if entries and entries[-1][0] == message["stream"]:
                entries[-1][1] += message["data"]
            else:
                entries.append([message["stream"], message["data"]])
        elif message["type"] == "rich":
            entries.append(message["item"])
    return entries


HTML = ["html", "<b>html</b>"]
PNG_ITEM = ["media", ["image/png", base64.b64encode(PNG).decode()]]
SVG = ["media", ["image/svg+xml", "<svg/>"]]


def test_hello_announces_rich_output(client):
    assert "rich-output" in client.hello["features"]


def test_display_between_two_prints_keeps_its_place(client):
    result = client.run("import sys\nprint('a')\nprint('e', file=sys.stderr)\ndisplay(Html())\nprint('b')")
    assert result.exit_code == 0
    assert console(result) == [["stdout", "a\n"], ["stderr", "e\n"], HTML, ["stdout", "b\n"]]


def test_png_is_the_base64_of_the_bytes(client):
    result = client.run("display(Png())")
    [item] = console(result)
    assert item == PNG_ITEM
    assert base64.b64decode(item[1][1], validate=True) == PNG


def test_png_given_as_base64_text_is_taken_too(client):
    result = client.run(
        "import base64\nclass B:\n    def _repr_png_(self):\n        return base64.encodebytes(PNG).decode()\nB()"
    )
    assert console(result) == [PNG_ITEM]


def test_preference_is_html_then_png_then_svg(client):
    result = client.run("display(All(), PngSvg(), Svg())")
    assert console(result) == [HTML, PNG_ITEM, SVG]


def test_a_method_that_raises_or_gives_none_is_skipped(client):
    result = client.run("display(Raising(), NoneHtml())")
    assert console(result) == [PNG_ITEM, SVG]
    assert result.exit_code == 0


def test_display_of_a_plain_object_prints_its_repr(client):
    result = client.run("display(Plain(), 'text', 3)\ndisplay()\nx = display(Html())\nprint(x)")
    assert console(result) == [["stdout", "<plain>\n'text'\n3\n"], HTML, ["stdout", "None\n"]]


def test_a_class_is_not_shown_by_its_unbound_methods(client):
    assert console(client.run("Html")) == [["stdout", "<class '__main__.Html'>\n"]]


def test_expression_results_with_a_rich_repr_are_rich_items(client):
    assert console(client.run("print('a')\nHtml()")) == [["stdout", "a\n"], HTML]
    assert console(client.run("Png()")) == [PNG_ITEM]
    assert console(client.run("Raising()")) == [PNG_ITEM]
    assert console(client.run("Plain()")) == [["stdout", "<plain>\n"]]
    assert console(client.run("type(_).__name__")) == [["stdout", "'Plain'\n"]]  # _ is set
    client.run("Html()")
    assert console(client.run("print(type(_).__name__)")) == [["stdout", "Html\n"]]


def test_ten_thousand_small_items_interleaved_with_prints_stay_in_order(client):
    result = client.run("for i in range(10000):\n    print(i)\n    display(Html())", timeout=120)
    assert result.exit_code == 0
    entries = console(result)
    assert entries == [entry for i in range(10000) for entry in (["stdout", f"{i}\n"], HTML)]


def test_items_from_threads_keep_their_place_with_prints_of_that_thread(client):
    result = client.run(
        "import threading\n"
        "def work():\n"
        "    for i in range(200):\n"
        "        print(i)\n"
        "        display(Svg())\n"
        "t = threading.Thread(target=work)\n"
        "t.start(); t.join()"
    )
    assert console(result) == [entry for i in range(200) for entry in (["stdout", f"{i}\n"], SVG)]


def test_a_user_stdout_wrapper_is_flushed_before_an_item(client):
    result = client.run(
        "import io, sys\n"
        "sys.stdout = io.TextIOWrapper(io.BufferedWriter(sys.stdout.buffer, 1 << 16))\n"
        "print('before')\n"
        "display(Html())\n"
        "print('after')\n"
        "sys.stdout.flush()"
    )
    assert console(result) == [["stdout", "before\n"], HTML, ["stdout", "after\n"]]


def test_a_png_of_a_few_megabytes_goes_through(client):
    result = client.run(
        "import os\nclass Big:\n    def _repr_png_(self):\n        return b'\\x89PNG' + os.urandom(5 << 20)\nBig()",
        timeout=60,
    )
    [item] = console(result)
    assert item[0] == "media" and len(base64.b64decode(item[1][1])) == (5 << 20) + 4


def test_an_item_over_the_limit_is_a_note_on_stderr(client):
    result = client.run(
        "class Huge:\n    def _repr_html_(self):\n        return 'x' * (9 << 20)\nprint(1)\ndisplay(Huge())\nprint(2)"
    )
    entries = console(result)
    assert entries[0] == ["stdout", "1\n"]
    assert entries[1][0] == "stderr" and "html output of" in entries[1][1] and "not shown" in entries[1][1]
    assert entries[2] == ["stdout", "2\n"]
    assert result.exit_code == 0


def test_a_malformed_item_frame_from_user_code_is_a_note_not_a_broken_interpreter(client):
    result = client.run(
        "import os, struct\n"
        "def is_socket(n):\n"
        "    try:\n"
        "        return os.readlink(f'/proc/self/fd/{n}').startswith('socket:')\n"
        "    except OSError:\n"
        "        return False\n"
        "fd = [int(n) for n in os.listdir('/proc/self/fd') if is_socket(n)][0]\n"
        'for body in (b\'not json\', b\'["media", ["image/gif", "x"]]\', b\'["stdout", "x"]\'):\n'
        "    payload = b'\\x01r' + body\n"
        "    os.write(fd, struct.pack('>I', len(payload)) + payload)\n"
        "x = 5"
    )
    assert result.exit_code == 0
    notes = [text for stream, text in result.outputs if stream == "stderr"]
    assert "".join(notes).count("a rich output item was dropped") == 3
    assert "image/gif" in "".join(notes)
    assert [m["type"] for m in result.messages].count("rich") == 0
    assert client.run("print(x)").stdout == "5\n"  # the same interpreter


def test_nothing_heavy_is_imported_and_our_modules_are_hidden(client):
    result = client.run(
        "import sys\n"
        "print('matplotlib' in sys.modules)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in\n"
        "    ('matplotlib', 'numpy', 'pandas', 'display', 'userio', 'jsoncodec', 'framing', 'completion')))\n"
        "print(callable(display))"
    )
    assert result.stdout == "False\n[]\nTrue\n"


def test_a_traceback_from_a_repr_shows_no_frames_of_ours_at_its_tail(client):
    result = client.run("class Bad:\n    def __repr__(self):\n        raise ValueError('bad repr')\ndisplay(Bad())")
    assert result.exit_code == 1
    assert "ValueError: bad repr" in result.stderr
    assert "display.py" not in result.stderr.splitlines()[-3]


# -- matplotlib, a stand-in package in the home ------------------------------------------------------

FAKE_MATPLOTLIB = {
    "matplotlib/__init__.py": "IMPORTED = True\n",
    "matplotlib/figure.py": textwrap.dedent(
        """
        class Figure:
            def __init__(self, number):
                self.number = number
            def savefig(self, buffer, format=None, bbox_inches=None):
                assert format == "png" and bbox_inches == "tight"
                buffer.write(b"\\x89PNG\\r\\n\\x1a\\n" + b"figure %d" % self.number)
        """
    ),
    "matplotlib/pyplot.py": textwrap.dedent(
        """
        from matplotlib.figure import Figure
        _figures = {}
        shown_by_original = []
        def figure(num=None):
            if num is None:
                num = max(_figures, default=0) + 1
            if num not in _figures:
                _figures[num] = Figure(num)
            return _figures[num]
        def gcf():
            return figure(max(_figures)) if _figures else figure()
        def get_fignums():
            return sorted(_figures)
        def close(fig=None):
            if fig == "all":
                _figures.clear()
            else:
                _figures.pop(getattr(fig, "number", fig), None)
        def plot(*args):
            gcf()
        def show(*args, **kwargs):
            shown_by_original.append(1)
        """
    ),
}


def figure_png(number):
    return ["media", ["image/png", base64.b64encode(b"\x89PNG\r\n\x1a\nfigure %d" % number).decode()]]


@pytest.fixture
def mpl_client(runner):
    for name, text in FAKE_MATPLOTLIB.items():
        path = os.path.join(runner.home, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        os.chown(os.path.dirname(path), USER_UID, USER_GID)
    c = Client(runner.socket_path)
    yield c
    c.close()


def test_plt_show_in_the_run_that_imports_pyplot_emits_open_figures_and_closes_them(mpl_client):
    result = mpl_client.run(
        "import matplotlib.pyplot as plt\n"
        "print('a')\n"
        "plt.plot([1, 2]); plt.figure()\n"
        "plt.show()\n"
        "print(plt.get_fignums(), plt.shown_by_original)"
    )
    assert result.exit_code == 0, result.stderr
    assert console(result) == [["stdout", "a\n"], figure_png(1), figure_png(2), ["stdout", "[] []\n"]]
    assert plt_loader_is_the_original(mpl_client)


def plt_loader_is_the_original(client):
    result = client.run(
        "import matplotlib.pyplot as plt\nprint(type(plt.__loader__).__name__, type(plt.__spec__.loader).__name__)"
    )
    return result.stdout == "SourceFileLoader SourceFileLoader\n"


def test_figures_left_open_are_shown_once_at_the_end_of_the_run(mpl_client):
    result = mpl_client.run("import matplotlib.pyplot as plt\nplt.plot([1])\nprint('drawn')")
    assert console(result) == [["stdout", "drawn\n"], figure_png(1)]
    result = mpl_client.run("print(plt.get_fignums())")
    assert console(result) == [["stdout", "[]\n"]]


def test_figures_are_shown_at_the_end_of_a_run_that_failed(mpl_client):
    result = mpl_client.run("import matplotlib.pyplot as plt\nplt.plot([1])\n1 / 0")
    assert result.exit_code == 1
    entries = console(result)
    assert entries[0] == figure_png(1)
    assert entries[1][0] == "stderr" and "ZeroDivisionError" in entries[1][1]


def test_display_of_a_figure_is_a_png_and_not_shown_again_at_the_end(mpl_client):
    result = mpl_client.run("import matplotlib.pyplot as plt\nfig = plt.figure()\nprint('a')\ndisplay(fig)\nprint('b')")
    assert console(result) == [["stdout", "a\n"], figure_png(1), ["stdout", "b\n"]]
    result = mpl_client.run("fig = plt.figure()\nfig")
    assert console(result) == [figure_png(1)]


def test_a_pyplot_put_in_sys_modules_by_hand_is_patched_too(mpl_client):
    assert mpl_client.run("import sys, types\nimport matplotlib.figure as mf\nsys.path.remove('')").exit_code == 0
    result = mpl_client.run(
        "import importlib.util, os\n"
        "spec = importlib.util.spec_from_file_location('matplotlib.pyplot', os.path.abspath('matplotlib/pyplot.py'))\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "sys.modules['matplotlib.pyplot'] = module"
    )
    assert result.exit_code == 0, result.stderr
    result = mpl_client.run("import matplotlib.pyplot as plt\nplt.figure()\nplt.show()\nprint(plt.shown_by_original)")
    assert console(result) == [figure_png(1), ["stdout", "[]\n"]]


def test_a_figure_that_cannot_be_drawn_is_a_note_and_is_closed(mpl_client):
    result = mpl_client.run(
        "import matplotlib.pyplot as plt\n"
        "fig = plt.figure()\n"
        "def broken(*args, **kwargs):\n"
        "    raise RuntimeError('no renderer')\n"
        "fig.savefig = broken\n"
        "plt.show()\n"
        "print(plt.get_fignums())"
    )
    assert result.exit_code == 0
    entries = console(result)
    assert entries[0][0] == "stderr" and "no renderer" in entries[0][1]
    assert entries[1] == ["stdout", "[]\n"]


def test_a_broken_pyplot_is_a_note_not_a_failed_run(client):
    result = client.run(
        "import sys, types\n"
        "sys.modules['matplotlib.pyplot'] = types.SimpleNamespace(get_fignums=lambda: 1 / 0)\n"
        "print('ran')"
    )
    assert result.exit_code == 0
    assert console(result)[0] == ["stdout", "ran\n"]
    assert "cannot show the open figures: ZeroDivisionError" in result.stderr
    assert client.run("del sys.modules['matplotlib.pyplot']\nprint(1)").stdout == "1\n"
