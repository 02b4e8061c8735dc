"""
Rich output (docs/protocol.md section 10) on real Docker through a real agent, with the
data-science kernel image: a matplotlib plot as a PNG, a pandas DataFrame as HTML,
``display()`` in its place among prints, figures left open shown once. The image is built
by ``scripts/build-kernel-image bai-kernel/python-sci:3.11``; without it these tests fail.
"""

import hashlib
import json
import struct
import zlib

import pytest
import pytest_twisted

from bai_agent.protocol import console as items
from tests.functional.agent_process import docker
from tests.functional.executing import run_to_end, text

pytestmark = pytest.mark.functional

SCI_IMAGE = "bai-kernel/python-sci:3.11"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def sci_image():
    if docker("image", "inspect", SCI_IMAGE, check=False).returncode != 0:
        pytest.fail(
            f"the kernel image {SCI_IMAGE} is missing: build it with scripts/build-kernel-image {SCI_IMAGE}",
            pytrace=False,
        )
    return SCI_IMAGE


def pngs(console):
    """The PNG pictures of a console, as bytes, after checking every item's shape."""
    parsed = items.parse_console(console)
    return [item.content for item in parsed if isinstance(item, items.Media) and item.mime == items.PNG]


def png_size(data):
    """(width, height) from a PNG's IHDR chunk, after checking the signature and its CRC."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16 : 16 + length]
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    assert zlib.crc32(kind + body) == crc
    return struct.unpack(">II", body[:8])


@pytest.fixture
def sci_kernel(client, sci_image):
    pytest_twisted.blockon(client.create_kernel("sci", sci_image, {"cpu": 1, "mem": "1g"}))
    return "sci"


@pytest_twisted.inlineCallbacks
def test_a_matplotlib_plot_arrives_as_a_valid_png_in_its_place(client, sci_kernel):
    console, answer = yield run_to_end(
        client,
        sci_kernel,
        "query",
        "import matplotlib.pyplot as plt\nprint('before')\nplt.plot([1, 3, 2])\nplt.show()\nprint('after')",
        options={"flush_timeout": 30},
    )
    assert answer["exit_code"] == 0, text(console, "stderr")
    kinds = [entry[0] for entry in console]
    assert kinds == ["stdout", "media", "stdout"], console
    assert console[0] == ["stdout", "before\n"] and console[2] == ["stdout", "after\n"]
    [png] = pngs(console)
    assert len(png) > 1024
    width, height = png_size(png)
    assert width > 100 and height > 100
    # show() closed it: nothing is left for the end of the run, or the next one.
    console, _ = yield run_to_end(client, sci_kernel, "query", "print(plt.get_fignums())")
    assert console == [["stdout", "[]\n"]]


@pytest_twisted.inlineCallbacks
def test_a_figure_left_open_is_shown_once_at_the_end_of_the_run(client, sci_kernel):
    console, answer = yield run_to_end(
        client,
        sci_kernel,
        "query",
        "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.bar(['a', 'b'], [3, 4])\nprint('drawn')",
        options={"flush_timeout": 30},
    )
    assert answer["exit_code"] == 0, text(console, "stderr")
    assert console[0] == ["stdout", "drawn\n"]
    assert len(pngs(console)) == 1 and len(console) == 2
    console, _ = yield run_to_end(client, sci_kernel, "query", "print(len(plt.get_fignums()))")
    assert console == [["stdout", "0\n"]]


@pytest_twisted.inlineCallbacks
def test_a_dataframe_expression_gives_an_html_table(client, sci_kernel):
    console, answer = yield run_to_end(
        client,
        sci_kernel,
        "query",
        "import pandas as pd\ndf = pd.DataFrame({'x': [1, 2], 'y': ['a', '\u00e9']})\ndf",
        options={"flush_timeout": 30},
    )
    assert answer["exit_code"] == 0, text(console, "stderr")
    [item] = items.parse_console(console)
    assert isinstance(item, items.Html)
    assert "<table" in item.text and "\u00e9" in item.text
    # A Series has no HTML: text, as before.
    console, _ = yield run_to_end(client, sci_kernel, "query", "df['x']")
    assert [entry[0] for entry in console] == ["stdout"] and "Name: x" in text(console)


@pytest_twisted.inlineCallbacks
def test_display_between_two_prints_keeps_its_place(client, sci_kernel):
    console, answer = yield run_to_end(
        client,
        sci_kernel,
        "query",
        "import pandas as pd, sys\n"
        "print('one')\n"
        "display(pd.DataFrame({'a': [1]}))\n"
        "print('err', file=sys.stderr)\n"
        "display(42)\n"
        "print('two')",
        options={"flush_timeout": 30},
    )
    assert answer["exit_code"] == 0, text(console, "stderr")
    assert [entry[0] for entry in console] == ["stdout", "html", "stderr", "stdout"], console
    assert console[0] == ["stdout", "one\n"]
    assert "<table" in console[1][1]
    assert console[2] == ["stderr", "err\n"]
    assert console[3] == ["stdout", "42\ntwo\n"]


@pytest_twisted.inlineCallbacks
def test_nothing_is_imported_until_user_code_does(client, sci_kernel):
    console, _ = yield run_to_end(
        client,
        sci_kernel,
        "query",
        "import sys, os\n"
        "print(sorted(m for m in ('matplotlib', 'matplotlib.pyplot', 'pandas', 'numpy') if m in sys.modules))\n"
        "print(os.environ.get('MPLBACKEND'))",
    )
    assert text(console).splitlines()[0] == "[]"


@pytest_twisted.inlineCallbacks
def test_the_console_is_one_json_document_whatever_the_html_holds(client, sci_kernel):
    answer = yield client.execute(
        sci_kernel,
        "query",
        "class H:\n    def _repr_html_(self):\n        return '<p>\"\\\\ \\n \\u2028 \\x00</p>'\nH()",
    )
    raw = json.dumps(answer["console"])
    assert items.parse_console(json.loads(raw)) == [items.Html('<p>"\\ \n \u2028 \x00</p>')]


@pytest_twisted.inlineCallbacks
def test_a_png_of_a_few_megabytes_goes_through_the_agent_and_a_larger_one_is_a_note(client, sci_kernel):
    code = (
        "import os\n"
        "class Big:\n"
        "    def __init__(self, size):\n"
        "        self.data = b'\\x89PNG\\r\\n\\x1a\\n' + os.urandom(size)\n"
        "    def _repr_png_(self):\n"
        "        return self.data\n"
        "big = Big(5 << 20)\n"
        "print('a')\n"
        "display(big, Big(7 << 20))\n"
        "print('b')"
    )
    console, answer = yield run_to_end(client, sci_kernel, "query", code, options={"flush_timeout": 30})
    assert answer["exit_code"] == 0, text(console, "stderr")
    assert [entry[0] for entry in console] == ["stdout", "media", "stderr", "stdout"]
    [png] = pngs(console)
    assert png[:8] == PNG_SIGNATURE and len(png) == (5 << 20) + 8
    assert "not shown" in console[2][1]
    console, _ = yield run_to_end(
        client, sci_kernel, "query", "import hashlib; print(hashlib.sha256(big.data).hexdigest())"
    )
    assert text(console) == hashlib.sha256(png).hexdigest() + "\n"  # the very bytes
