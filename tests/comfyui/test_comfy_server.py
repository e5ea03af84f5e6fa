"""The pack in the real ComfyUI: ``main.py --cpu`` on 127.0.0.1 with a scratch base directory (the snapshot is
never written), the pack and the test-only ``tiny_nodes`` linked into its ``custom_nodes``, tiny random weights
from ``tiny_models.py``. ``/object_info`` must list every node of the pack; each shipped example workflow (API
format, on the tiny files) goes to ``/prompt`` and must leave its images in ``/history``; the UI-format twins
must match the API ones under the live node definitions. The server is always stopped."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from helpers.comfy import COMFYUI, ROOT, import_comfy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import example_workflows  # noqa: E402

PACK = os.path.join(ROOT, "comfyui_anystory")
TINY_NODES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_nodes")
STARTUP_S, RUN_S = 120, 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url, data, timeout=30):
    req = urllib.request.Request(url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"/prompt refused the workflow: {e.read().decode()[:2000]}") from None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not os.path.isfile(os.path.join(COMFYUI, "main.py")):
        pytest.skip(f"ComfyUI snapshot not found at {COMFYUI}")
    base = tmp_path_factory.mktemp("comfy_base")
    # no PYTHONPATH: the linked pack must find this repository's ``anystory`` by itself
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    subprocess.run([sys.executable, os.path.join(os.path.dirname(TINY_NODES), "tiny_models.py"), str(base)],
                   check=True, env=env, capture_output=True)
    nodes = base / "custom_nodes"
    nodes.mkdir()
    os.symlink(PACK, nodes / "comfyui_anystory")
    os.symlink(TINY_NODES, nodes / "anystory_test_tiny_nodes")
    port = _free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--disable-auto-launch", "--base-directory", str(base),
                             "--database-url", "sqlite:///:memory:"],
                            cwd=COMFYUI, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_S
        while True:
            try:
                _get(url + "/system_stats", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError("ComfyUI did not start:\n" + (base / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url, base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def object_info(server):
    return _get(server[0] + "/object_info", timeout=60)


def test_object_info_lists_every_node(object_info):
    import_comfy()
    from comfyui_anystory.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    for node in NODE_CLASS_MAPPINGS:
        assert node in object_info, f"{node} missing from /object_info"
        assert object_info[node]["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[node]
    assert object_info["AnyStoryLoader"]["input"]["required"]["anystory_name"][0] == ["anystory_flux.bin"]
    assert object_info["AnyStoryApply"]["output"] == ["MODEL"]
    assert object_info["AnyStoryRoutingMaps"]["output"] == ["MASK", "IMAGE"]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ui_workflow_matches_api_workflow(object_info, n):
    with open(os.path.join(example_workflows.SHIPPED, example_workflows.name(n) + "_api.json")) as f:
        api = json.load(f)
    with open(os.path.join(example_workflows.SHIPPED, example_workflows.name(n) + ".json")) as f:
        ui = json.load(f)
    assert api == example_workflows.api_workflow(n)
    assert ui == example_workflows.ui_workflow(api, object_info)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_example_workflow_runs(server, n):
    url, base = server
    with open(os.path.join(example_workflows.SHIPPED, example_workflows.name(n) + "_api.json")) as f:
        graph = example_workflows.tiny_workflow(json.load(f))
    prompt_id = _post(url + "/prompt", {"prompt": graph, "client_id": "anystory-test"})["prompt_id"]
    deadline = time.time() + RUN_S
    while True:
        history = _get(f"{url}/history/{prompt_id}").get(prompt_id)
        if history and history.get("status", {}).get("completed") is not None:
            break
        assert time.time() < deadline, "the workflow did not finish:\n" + (base / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    status = history["status"]
    assert status["status_str"] == "success", json.dumps(status["messages"])[-3000:]
    for node, prefix in (("44", f"AnyStory_{n}"), ("46", f"AnyStory_{n}_routing")):
        images = history["outputs"][node]["images"]
        assert len(images) == 1 and images[0]["filename"].startswith(prefix)
        assert os.path.isfile(os.path.join(base, "output", images[0]["subfolder"], images[0]["filename"]))
