"""
The data-science kernel image (``scripts/build-kernel-image bai-kernel/python-sci:3.11``)
through a real agent: one kernel computes with numpy, scipy, pandas, matplotlib (headless,
Agg) and scikit-learn; the image declares the jupyter service (docs/protocol.md section 7).
"""

import json

import pytest
import pytest_twisted

from bai_agent.protocol.client import AgentClient
from tests.functional.agent_process import docker, running_agent
from tests.functional.executing import run_to_end, text

pytestmark = pytest.mark.functional

SCI_IMAGE = "bai-kernel/python-sci:3.11"
SERVICE_DEF = "/etc/backend.ai/service-defs/jupyter.json"

CODE = """\
import io
import importlib.util
import numpy as np
import pandas as pd
import matplotlib
import matplotlib.pyplot as plt
import sklearn
from scipy import integrate
from sklearn.linear_model import LinearRegression

print("numpy", int(np.arange(10).sum()), round(float(np.linalg.det(np.array([[2.0, 1.0], [1.0, 3.0]]))), 6))
print("scipy", round(integrate.quad(lambda x: x * x, 0, 3)[0], 6))
frame = pd.DataFrame({"k": ["a", "b", "a"], "v": [1, 2, 3]})
print("pandas", frame.groupby("k")["v"].sum().to_dict())
print("backend", matplotlib.get_backend().lower())
figure, axes = plt.subplots()
axes.plot([0, 1], [0, 1])
png = io.BytesIO()
figure.savefig(png, format="png")
plt.close(figure)
print("png", png.getvalue()[:8] == b"\\x89PNG\\r\\n\\x1a\\n")
x = np.arange(10.0).reshape(-1, 1)
model = LinearRegression().fit(x, 2 * x.ravel() + 1)
print("sklearn", round(float(model.coef_[0]), 6), round(float(model.intercept_), 6))
print("tkinter", importlib.util.find_spec("tkinter") is not None)
"""

EXPECTED = """\
numpy 45 5.0
scipy 9.0
pandas {'a': 4, 'b': 2}
backend agg
png True
sklearn 2.0 1.0
tkinter False
"""


@pytest.fixture(scope="module")
def sci_image(docker_host):
    """The image's ``docker image inspect`` record; the test fails (never skips) without it."""
    inspect = docker("image", "inspect", SCI_IMAGE, docker_host=docker_host, check=False)
    if inspect.returncode != 0:
        pytest.fail(
            f"the kernel image {SCI_IMAGE} is missing: build it (a few minutes, as root) with\n"
            f"    scripts/build-kernel-image {SCI_IMAGE}",
            pytrace=False,
        )
    return json.loads(inspect.stdout)[0]


@pytest.fixture(scope="module")
def sci_kernel(sci_image, tmp_path_factory, etcd_server):
    """A client of a real agent, and the one kernel of this module on the sci image (1 GiB)."""
    from twisted.internet import reactor

    with running_agent(tmp_path_factory.mktemp("sci"), etcd_server.addr, "agent-sci") as agent:
        secret = agent.secret_path.read_text().strip()
        client = pytest_twisted.blockon(AgentClient.connect(reactor, f"127.0.0.1:{agent.amp_port}", secret))
        try:
            pytest_twisted.blockon(client.create_kernel("sci", SCI_IMAGE, {"cpu": 1, "mem": "1g"}))
            yield client
        finally:
            pytest_twisted.blockon(client.reset())
            client.close()


@pytest_twisted.inlineCallbacks
def test_the_stack_computes_in_a_kernel(sci_kernel):
    console, answer = yield run_to_end(sci_kernel, "sci", "query", CODE)
    stdout, stderr = text(console, "stdout"), text(console, "stderr")
    assert (answer["exit_code"], stdout) == (0, EXPECTED), stderr


def test_the_image_declares_the_jupyter_service(sci_image, docker_host):
    labels = sci_image["Config"]["Labels"]
    assert labels["ai.backend.kernelspec"] == "1"
    assert "jupyter:http:8888" in labels["ai.backend.service-ports"].split(",")
    assert "MPLBACKEND=Agg" in sci_image["Config"]["Env"]
    cat = docker(
        "run", "--rm", "--network", "none", "--entrypoint", "cat", SCI_IMAGE, SERVICE_DEF, docker_host=docker_host
    )
    service = json.loads(cat.stdout)
    command = service["command"]
    assert isinstance(command, list) and all(isinstance(arg, str) for arg in command)
    assert "--port={port}" in command and "--NotebookApp.token={token}" in command
    assert "--notebook-dir={home}" in command and "--ip=127.0.0.1" in command
    assert service["env"] == {}
    assert service["url_template"] == "http://{host}:{port}/?token={token}"
