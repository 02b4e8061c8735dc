"""
What a data scientist sees: Jupyter of a kernel opened in headless Chromium through the
agent's relay (the kernel has no network). A notebook made in the kernel's home is opened,
its cell runs in the Jupyter kernel (over the notebook's websocket, through the relay),
and its output is on the page; a screenshot is kept in ``artifacts/jupyter-notebook.png``.
"""

import json

import pytest
import pytest_twisted

from bai_agent.testing.waiting import sleep
from tests.functional.test_rich_output_real import sci_image  # noqa: F401 (fixture)
from tests.functional.test_services_real import get
from tests.functional.test_status_browser import chromium, dom, in_thread, png_size, screenshot

pytestmark = pytest.mark.functional

NOTEBOOK = {
    "cells": [
        {
            "cell_type": "code",
            "execution_count": None,
            "metadata": {},
            "outputs": [],
            "source": ["import socket\n", "print('answer', 6 * 7, 'from', socket.gethostname())"],
        }
    ],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}
# The classic notebook loads the user's custom.js: once the page is connected to its
# Jupyter kernel, run every cell, as a person pressing Run would.
RUN_ON_OPEN = """
require(['base/js/namespace', 'base/js/events'], function (Jupyter, events) {
  var ran = false;
  function run() {
    var kernel = Jupyter.notebook && Jupyter.notebook.kernel;
    if (!ran && kernel && kernel.is_connected()) {
      ran = true;
      Jupyter.notebook.execute_all_cells();
    }
  }
  // Once the cell has run, the notebook is saved with its output (what the test reads back).
  var saved = false;
  events.on('finished_execute.CodeCell', function () { Jupyter.notebook.save_notebook(); });
  events.on('notebook_saved.Notebook', function () { if (ran) { saved = true; } });
  // Headless Chromium's virtual time stands still while a fetch is pending, and a
  // websocket is no fetch: a chain of small fetches gives the kernel's answer real time
  // to arrive, until the notebook is saved with it.
  function awake(left) {
    if (saved || left <= 0) { return; }
    var next = function () { awake(left - 1); };
    fetch(Jupyter.notebook.base_url + 'api/status', {credentials: 'same-origin'}).then(next, next);
  }
  awake(20000);
  events.on('kernel_ready.Kernel', run);
  events.on('kernel_connected.Kernel', run);
  events.on('notebook_loaded.Notebook', run);
  run();
  var poll = setInterval(function () { run(); if (ran) { clearInterval(poll); } }, 1000);
});
"""


@pytest_twisted.inlineCallbacks
def test_a_notebook_opened_through_the_relay_runs_its_cell(client, sci_image, reactor):  # noqa: F811
    yield client.create_kernel("nb", sci_image, {"cpu": 1, "mem": "1g"})
    yield client.upload_file("nb", "analysis.ipynb", json.dumps(NOTEBOOK).encode())
    yield client.upload_file("nb", ".jupyter/custom/custom.js", RUN_ON_OPEN.encode())
    endpoint = yield client.start_service("nb", "jupyter", {"timeout": 90})
    base, token = endpoint["url"].split("/?token=")
    tree = (yield dom(reactor, endpoint["url"])).decode()
    assert "analysis.ipynb" in tree
    # The notebook's Jupyter kernel is started first (as reopening a notebook finds it), so
    # that the page finds it ready within the browser's time budget.
    session = {"path": "analysis.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
    status, body = yield in_thread(
        reactor, get, f"{base}/api/sessions?token={token}", "POST", json.dumps(session).encode()
    )
    assert status == 201
    url = f"{base}/notebooks/analysis.ipynb?token={token}"
    # Headless Chromium's virtual time may run out before the cell's output comes back over
    # the websocket: then the page is loaded again, as a person would. The output is looked
    # for on the page and in the notebook the page saved into the kernel's home.
    for _ in range(12):
        page = (yield in_thread(reactor, chromium, "--virtual-time-budget=60000", "--dump-dom", url)).decode()
        saved = yield client.download_file("nb", "analysis.ipynb")
        outputs = json.loads(saved["data"])["cells"][0]["outputs"]
        if "answer 42 from" in page or outputs:
            break
        yield sleep(reactor, 3)
    assert outputs and outputs[0]["text"][0].startswith("answer 42 from"), outputs
    path = yield screenshot(reactor, url, "jupyter-notebook.png", budget=60000)
    assert png_size(path) == (1280, 900)
    yield client.destroy_kernel("nb")
