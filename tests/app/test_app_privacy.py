"""What the public demo keeps of a visitor (docs/privacy.md): uploads stored under no name of theirs, readable by no
other local user, deleted after the retention window, when the session ends, and when the app stops."""
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import types

import httpx
import pytest

import app
from anystory.app.retention import SessionFiles, anonymous_name, retention_seconds

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAR = os.path.join(ROOT, "assets", "examples", "red_striped_star.png")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``app.py --model tiny`` with a 2-second retention window, on loopback."""
    port = _free_port()
    log = tmp_path_factory.mktemp("privacy") / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")  # the log shows how far a stop got; SIGABRT dumps threads
    env.pop("GRADIO_TEMP_DIR", None)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--model", "tiny", "--host", "127.0.0.1", "--port", str(port),
                                 "--retention", "2"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/config", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
        assert proc.poll() is None, log.read_text()
    else:
        proc.kill()
        pytest.fail("the app did not start:\n" + log.read_text())
    yield types.SimpleNamespace(url=url, proc=proc, log=log)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _upload(url: str, name: str) -> str:
    with open(STAR, "rb") as f:
        r = httpx.post(url + "/gradio_api/upload", files={"files": (name, f, "image/png")}, timeout=10)
    r.raise_for_status()
    return r.json()[0]


def test_an_upload_carries_no_name_of_the_visitor_is_private_and_is_gone_after_the_window(server):
    path = _upload(server.url, "jane_doe_passport.png")
    assert os.path.basename(path) == "upload.png" and "jane" not in path
    root = os.path.dirname(os.path.dirname(os.path.dirname(path)))
    assert _mode(path) == 0o600 and _mode(os.path.dirname(path)) == 0o700 and _mode(root) == 0o700
    other = _upload(server.url, "jane_doe_passport.png")  # the same photo again: its own random folder
    assert os.path.dirname(other) != os.path.dirname(path)
    cache = os.path.dirname(os.path.dirname(path))
    assert not [n for n in os.listdir(cache) if n.startswith(".incoming")]  # no staging folder left
    copies = [os.path.join(b, n) for b, _, names in os.walk(cache) for n in names if n == "red_striped_star.png"]
    example = _upload(server.url, "red_striped_star.png")  # an example's own content and name
    assert os.path.basename(example) == "upload.png" and os.path.isfile(example)
    assert copies and all(os.path.isfile(c) for c in copies)  # the page's cached copy of the example stays
    deadline = time.time() + 15
    while os.path.exists(path) and time.time() < deadline:
        time.sleep(0.25)
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))


def test_monitoring_is_off(server):
    for route in ("/monitoring", "/monitoring/summary"):
        assert httpx.get(server.url + route, timeout=5).status_code in (401, 403, 404)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_small_hostile_requests_cost_the_server_little_memory(server, tmp_path):
    """Each request under 1 MB that once cost 0.5-7 GB: refused by the running app within +200 MB of RSS."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    from PIL import Image

    from helpers.hostile import alias_bomb

    config = httpx.get(server.url + "/config", timeout=10).json()
    editor = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "subject-1-draw")
    bomb = tmp_path / "story.yaml"
    bomb.write_text(alias_bomb(7))
    big = tmp_path / "big.png"
    Image.new("1", (8000, 8000)).save(big)
    assert bomb.stat().st_size < 1000 and big.stat().st_size < 2**20
    client = Client(server.url, verbose=False)
    requests = {
        "blob layer index 1e8": lambda: httpx.post(
            server.url + "/gradio_api/component_server", timeout=30,
            data={"component_id": str(editor), "session_hash": "h", "fn_name": "accept_blobs", "type": "layer",
                  "index": "100000000", "id": "x"}, files={"blob": ("blob", open(STAR, "rb"), "image/png")}),
        "blob 8000x8000": lambda: httpx.post(
            server.url + "/gradio_api/component_server", timeout=30,
            data={"component_id": str(editor), "session_hash": "h", "fn_name": "accept_blobs", "type": "background",
                  "index": "null", "id": "y"}, files={"blob": ("blob", open(big, "rb"), "image/png")}),
        "YAML alias bomb": lambda: client.predict(handle_file(str(bomb)), api_name="/on_import"),
        "editor value 8000x8000": lambda: client.predict(
            handle_file(STAR), None, {"background": handle_file(str(big)), "layers": [], "composite": None},
            api_name="/on_mask_inputs"),
    }
    try:
        for name, send in requests.items():
            before = _rss_mb(server.proc.pid)
            try:
                response = send()
            except AppError as e:  # a refusal raised on the server (gr.Error) reaches the client as an AppError
                response = e
            grown = _rss_mb(server.proc.pid) - before
            assert grown < 200, (name, grown, response)
            if isinstance(response, httpx.Response):
                assert response.status_code != 200, (name, response.text[:200])
            elif name == "editor value 8000x8000":
                assert "8000x8000 pixels; the limit is 4096x4096" in str(response), response
    finally:
        client.close()  # its heartbeat keeps a stream to the app open; the next test stops the app
    assert server.proc.poll() is None


def test_the_app_leaves_nothing_when_it_stops(server):
    path = _upload(server.url, "holiday.jpg.png")
    root = os.path.dirname(os.path.dirname(os.path.dirname(path)))
    server.proc.send_signal(signal.SIGINT)
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack to the log
        server.proc.wait(timeout=10)
        pytest.fail("the app did not stop within 30 s of SIGINT; its threads then:\n" + server.log.read_text())
    assert not os.path.exists(root), server.log.read_text()


def test_a_session_end_deletes_its_uploads_and_results(handle, tmp_path):
    """The page's unload handler (Gradio calls it when the tab closes) removes the session's files, not others'."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    kept = SessionFiles(str(tmp_path / "run"), str(uploads), ttl=3600)
    demo = app.build_demo(handle, app.LazyBiRefNetSegmenter(), kept=kept)
    unload = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_unload")
    mine, theirs = types.SimpleNamespace(session_hash="a"), types.SimpleNamespace(session_hash="b")
    files = {}
    for who in (mine, theirs):
        folder = uploads / who.session_hash
        folder.mkdir()
        upload = folder / "upload.png"
        upload.write_bytes(b"x")
        kept.claim(who, {"background": str(upload)}, [str(upload)], "not a path")
        result = os.path.join(kept.folder(who), "out.png")
        open(result, "wb").close()
        files[who.session_hash] = (str(upload), result)
    example = uploads / "0123abcd"
    example.mkdir()
    (example / "red_striped_star.png").write_bytes(b"x")  # an example's cache copy: every session's
    kept.claim(mine, str(example / "red_striped_star.png"))
    unload(mine)
    assert not any(os.path.exists(p) for p in files["a"])
    assert all(os.path.exists(p) for p in files["b"]) and (example / "red_striped_star.png").exists()


def test_the_sweep_deletes_what_is_older_than_the_window_and_keeps_the_rest(tmp_path):
    uploads = tmp_path / "uploads"
    (uploads / "abc").mkdir(parents=True)
    old_upload = uploads / "abc" / "upload.png"
    old_upload.write_bytes(b"x")
    (uploads / "gradio-default").mkdir()
    page_value = uploads / "gradio-default" / "image.png"  # Gradio's own cache copy: its delete_cache decides
    page_value.write_bytes(b"x")
    kept = SessionFiles(str(tmp_path / "run"), str(uploads), ttl=60)
    old = kept.folder(types.SimpleNamespace(session_hash="a"))
    new = kept.folder(types.SimpleNamespace(session_hash="b"))
    past = time.time() - 120
    for p in (old, old_upload):
        os.utime(p, (past, past))
    assert kept.sweep() == 2
    assert not os.path.exists(old) and not old_upload.exists() and not (uploads / "abc").exists()
    assert os.path.exists(new) and page_value.exists()


def test_retention_setting_and_upload_names():
    assert retention_seconds("") == 3600 and retention_seconds("5") == 5
    with pytest.raises(ValueError, match="ANYSTORY_RETENTION_S"):
        retention_seconds("soon")
    assert anonymous_name("jane doe.JPG") == "upload.jpg" and anonymous_name("evil.sh") == "upload"


def test_auth_from_the_flag_or_the_environment_and_no_monitoring(handle, monkeypatch, tmp_path):
    launched = []
    monkeypatch.setattr(app, "load_model", lambda env, kind: handle)
    monkeypatch.setattr(app.gr.Blocks, "launch", lambda self, **kw: launched.append(kw))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # main() points it at its own folder; restored after
    old_umask = os.umask(0o022)
    try:
        assert app.main(["--model", "tiny", "--auth", "ann:secret,bo:pw"]) == 0
        monkeypatch.setenv(app.AUTH_ENV, "eve:pw")
        assert app.main(["--model", "tiny"]) == 0
        assert app.main(["--model", "tiny", "--auth", "no-password"]) == 2
    finally:
        os.umask(old_umask)
    assert [kw["auth"] for kw in launched] == [[("ann", "secret"), ("bo", "pw")], [("eve", "pw")]]
    assert all(kw["enable_monitoring"] is False for kw in launched)
