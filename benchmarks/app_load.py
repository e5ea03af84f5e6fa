"""``python -m benchmarks.app_load [--sessions 16] [--jobs 3] [--model miniature]``: the demo under load, on loopback.

Starts ``app.py`` on 127.0.0.1 (a free port; never another address), runs each distinct request once alone for
its reference image, then ``--sessions`` concurrent browser sessions (one Gradio client each, so one session hash
each) that send ``--jobs`` Generate requests one after another (the app holds one job per session). Prints: errors,
latency p50/p95 (submit to result, queueing included), the server's resident memory before and after, and
whether every result is pixel-identical to the same request run alone. Bounded: sessions x jobs requests, each
with a timeout; the server is stopped at the end whatever happens. Numbers go to docs/demo-hardening.md.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAR = os.path.join(ROOT, "assets", "examples", "red_striped_star.png")
MOON = os.path.join(ROOT, "assets", "examples", "blue_dotted_moon.png")
HOST = "127.0.0.1"
SLOT_FIELDS = 8  # anystory.app.generate_tab.SLOT_FIELDS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start_app(model: str, log_path: str) -> tuple:
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--model", model, "--host", HOST, "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}/"
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited; see {log_path}")
        try:
            if httpx.get(url + "config", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the app did not start in 300 s; see {log_path}")


def request_args(client, seed: int, steps: int) -> list:
    """The Generate event's inputs: one subject (two for odd seeds), a fixed prompt, ``seed``."""
    from gradio_client import handle_file

    n_inputs = len(client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/on_generate"]
                   ["parameters"])
    slots = (n_inputs - 9) // SLOT_FIELDS
    images = [STAR, MOON] if seed % 2 else [STAR]
    values = []
    for k in range(slots):
        image = handle_file(images[k]) if k < len(images) else None
        values += [image, None, None, f"s{k}", 1.0, 1.0, "", None]
    prompt = "a red striped star and a blue dotted moon on sand" if seed % 2 else "a red striped star on grass"
    return [len(images), prompt, "", seed, steps, 3.0, None, None, 1] + values


def run_one(client, seed: int, steps: int) -> np.ndarray:
    out = client.predict(*request_args(client, seed, steps), api_name="/on_generate")
    files = out[4]
    path = files[0] if isinstance(files[0], str) else files[0].get("path") or files[0].get("name")
    return np.asarray(Image.open(path).convert("RGB"))


def abandoned_wait(url: str, client, steps: int, long_steps: int = 100) -> tuple:
    """A visitor starts a ``long_steps`` job and closes the tab (its event stream) after its first progress
    update; another visitor then asks for a ``steps`` job. Returns (the second visitor's latency, the same
    request's latency alone): with the job cancelled they are close, without it the second waits for all
    ``long_steps``."""
    import httpx

    args = request_args(client, 7, long_steps)
    with open(STAR, "rb") as f:
        uploaded = httpx.post(url + "gradio_api/upload", files={"files": ("star.png", f, "image/png")}).json()[0]
    data = [{"path": uploaded, "meta": {"_type": "gradio.FileData"}} if isinstance(a, dict) else a for a in args]
    config = httpx.get(url + "config").json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "on_generate")
    session = "abandon" + str(time.time_ns())
    httpx.post(url + "gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                     "event_data": None, "trigger_id": None}).raise_for_status()
    with httpx.stream("GET", url + f"gradio_api/queue/data?session_hash={session}", timeout=120) as stream:
        for line in stream.iter_lines():
            if "process_generating" in line:  # the job runs and has sent its first update: close the tab
                break
    start = time.perf_counter()
    run_one(client, 1001, steps)
    waited = time.perf_counter() - start
    start = time.perf_counter()
    run_one(client, 1001, steps)
    return waited, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.app_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--jobs", type=int, default=3, help="requests per session, one after another")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--model", default="miniature", choices=("miniature", "tiny"))
    p.add_argument("--timeout", type=float, default=600, help="seconds for the whole load phase")
    args = p.parse_args(argv)
    if not (1 <= args.sessions <= 64 and 1 <= args.jobs <= 10):
        p.error("bounded: 1-64 sessions, 1-10 jobs each")
    from gradio_client import Client

    log = os.path.join(tempfile.gettempdir(), "anystory_app_load_server.log")
    proc, url = start_app(args.model, log)
    try:
        seeds = [1000 + j for j in range(args.jobs)]
        alone, alone_s = {}, []
        for s in seeds:
            start = time.perf_counter()
            alone[s] = run_one(Client(url, verbose=False), s, args.steps)
            alone_s.append(time.perf_counter() - start)
        rss_before = rss_mb(proc.pid)
        latencies, errors, mismatches, lock = [], [], 0, threading.Lock()

        def session():
            nonlocal mismatches
            try:
                client = Client(url, verbose=False)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"connect: {type(e).__name__}: {e}")
                return
            for seed in seeds:
                start = time.perf_counter()
                try:
                    image = run_one(client, seed, args.steps)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - start)
                    mismatches += not np.array_equal(image, alone[seed])

        threads = [threading.Thread(target=session, daemon=True) for _ in range(args.sessions)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, args.timeout - (time.perf_counter() - start)))
        wall = time.perf_counter() - start
        rss_after = rss_mb(proc.pid)
        requests = args.sessions * args.jobs
        waited, single = abandoned_wait(url, Client(url, verbose=False), args.steps)
        q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else [float("nan")] * 19
        print(f"app load: {args.sessions} sessions x {args.jobs} jobs = {requests} requests, model {args.model}, "
              f"{args.steps} steps, on {HOST}")
        print(f"  results: {len(latencies)}/{requests}, errors {len(errors)}, not pixel-identical to the same "
              f"request alone: {mismatches}")
        print(f"  latency (submit to result): p50 {statistics.median(latencies) if latencies else float('nan'):.2f} s, "
              f"p95 {q[18]:.2f} s; wall {wall:.1f} s")
        print(f"  server resident memory: {rss_before:.0f} MB before, {rss_after:.0f} MB after "
              f"({rss_after - rss_before:+.0f} MB)")
        print(f"  one request alone: median {statistics.median(alone_s):.2f} s")
        print(f"  after a 100-step job whose tab closed at its first update, the next visitor's request took "
              f"{waited:.2f} s (the same request alone right after: {single:.2f} s)")
        for e in sorted(set(errors))[:5]:
            print(f"  error: {e}")
        return 0 if not errors and not mismatches and len(latencies) == requests else 1
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
