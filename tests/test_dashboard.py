"""The Visdom dashboard: a server started offline, a real browser looking at it, and training
that never waits for a missing, dead or hanging server."""
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import visdom
from conftest import ROOT, options

from main import replay, train

ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """The documented command, on a free port, stopped by its PID afterwards."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen([sys.executable, "visdom_server.py", "start", f"--port={port}",
                                f"--env-path={tmp_path / 'visdom_data'}"], cwd=ROOT, stdout=log, stderr=log)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}", timeout=1)
            break
        except requests.RequestException:
            assert process.poll() is None, open(tmp_path / "server.log").read()
            time.sleep(0.3)
    yield port
    process.terminate()
    process.wait(timeout=30)
    log.close()


def listening_addresses(port):
    """The local addresses with a socket listening on `port`, from the kernel's tables."""
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as file:
            for line in file.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    addresses.append(address)
    return addresses


def test_server_listens_on_loopback_only(server):
    assert listening_addresses(server) == ["0100007F"]  # 127.0.0.1, and no other address
    page = requests.get(f"http://127.0.0.1:{server}", timeout=5)
    assert page.status_code == 200
    scripts = re.findall(r'src="?(/static/[^" >]+)', page.text)
    assert scripts
    for script in scripts:
        assert requests.get(f"http://127.0.0.1:{server}{script.split('?')[0]}", timeout=5).status_code == 200, script


@pytest.mark.slow
@pytest.mark.skipif(not (os.path.exists("/usr/bin/chromium") and os.path.isdir(os.path.join(ROOT, "node_modules"))),
                    reason="needs Debian chromium and `npm install` (install.sh installs both)")
def test_browser_shows_live_training(demo, tmp_path, server):
    train(**options(demo, tmp_path, vis_port=server, env="live", epoch=2, plot_every=2))
    os.makedirs(ARTIFACTS, exist_ok=True)
    screenshot = os.path.join(ARTIFACTS, "dashboard.png")
    run = subprocess.run(["node", "tests/browser_check.js", f"http://127.0.0.1:{server}", "live", screenshot],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    page = json.loads(run.stdout)
    titles = {pane["title"].strip() for pane in page["panes"]}
    assert {"loss", "captions", "configuration", "log", "validation metrics"} <= titles, titles
    panes = {pane["title"].strip(): pane for pane in page["panes"]}
    assert {t["name"]: t["points"] > 0 for t in panes["loss"]["traces"]} == {"train": True, "val": True}
    assert re.search(r"[\u4e00-\u9fff]{4}", panes["captions"]["text"]) and "人工描述" in panes["captions"]["text"]
    image_panes = [pane for pane in page["panes"] if pane["images"]]
    assert image_panes and image_panes[0]["images"][0] > 0
    assert re.search(r"[\u4e00-\u9fff]", image_panes[0]["title"])  # titled with its human caption
    assert page["consoleErrors"] == [] and page["outsideRequests"] == []
    assert os.path.getsize(screenshot) > 10000


def test_offline_run_replays_into_a_server(demo, tmp_path, server, capsys):
    train(**options(demo, tmp_path, vis_port=free_port(), env="offline", epoch=1, plot_every=3))
    capsys.readouterr()
    replay(**options(demo, tmp_path, vis_port=server, log=str(tmp_path / "logs" / "offline.visdom.log")))
    assert "environment offline" in capsys.readouterr().out  # where it posted, not the default --env
    client = visdom.Visdom(port=server, env="offline", use_incoming_socket=False, raise_exceptions=True)
    for window in ("loss", "captions", "image", "config"):
        assert client.win_exists(window), window


class BadVisdom(http.server.BaseHTTPRequestHandler):
    """Answers the start-up check, so it looks alive; then, as `mode` says, hangs on every post
    or dies (closes its port)."""

    mode = "hang"

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        if self.mode == "die":
            threading.Thread(target=self.server.shutdown).start()

    def do_POST(self):
        time.sleep(60)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("mode", ["hang", "die"])
def test_hanging_or_dead_server_never_slows_training(demo, tmp_path, mode):
    bad = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (BadVisdom,), {"mode": mode}))
    serving = threading.Thread(target=bad.serve_forever, daemon=True)
    serving.start()
    started = time.time()
    train(**options(demo, tmp_path, vis_port=bad.server_address[1], env=mode, epoch=1, plot_every=1,
                    eval_size=0, metric="val_loss", vis_timeout=5))
    elapsed = time.time() - started
    if mode == "hang":
        bad.shutdown()
    serving.join(10)
    bad.server_close()
    # 19 dashboard updates at a 5-second timeout each would take over 90 s if training waited for them
    assert elapsed < 60
    assert os.path.getsize(tmp_path / "logs" / f"{mode}.visdom.log") > 0


def test_the_configuration_pane_shows_what_the_features_really_are(demo, tmp_path):
    """The demo's features are MobileNetV2 7x7 regions, whatever the training command's defaults say."""
    assert (demo.backbone, demo.grid) == ("resnet50", 0)
    train(**options(demo, tmp_path, vis_port=free_port(), env="config", epoch=1, eval_size=0, metric="val_loss"))
    [pane] = [line for line in open(tmp_path / "logs" / "config.visdom.log") if '"win": "config"' in line]
    assert "&quot;backbone&quot;: &quot;mobilenet_v2&quot;" in pane and "&quot;grid&quot;: 7" in pane
    assert f"&quot;img_path&quot;: &quot;{os.path.abspath(demo.img_path)}&quot;" in pane
