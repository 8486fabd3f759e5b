"""`main.py serve` as users and hostile clients meet it: one server (the documented command, on loopback,
stopped by the module's teardown) answers photos with the captions generate gives, refuses every bad upload
with a 4xx JSON line, sheds load with 503, and after each of those still answers /health and the next real
photo with the same caption. Nothing an upload sends is written to disk."""
import base64
import concurrent.futures
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

import pytest
import requests
from conftest import ROOT, options
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_dashboard import free_port, listening_addresses

import main


@pytest.fixture(scope="module")
def checkpoint(demo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    main.train(**options(demo, folder, model="attention", epoch=1, eval_size=0, metric="val_loss"))
    return str(folder / "checkpoints" / "best.pth")


@pytest.fixture(scope="module")
def photo(demo):
    path = os.path.join(demo.img_path, "val_0003.jpg")
    return path, open(path, "rb").read()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """The documented command with a small queue, on a free port; its TMPDIR starts empty and must stay so."""
    folder = tmp_path_factory.mktemp("server")
    (folder / "tmp").mkdir()
    port, log = free_port(), open(folder / "server.log", "w")
    process = subprocess.Popen([sys.executable, "main.py", "serve", f"--model-ckpt={checkpoint}", f"--port={port}",
                                "--max-queue=24", "--max-upload-mb=2"], cwd=ROOT, stdout=log, stderr=log,
                               env={**os.environ, "TMPDIR": str(folder / "tmp")}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert process.poll() is None and time.time() < deadline, open(folder / "server.log").read()
            try:
                if requests.get(f"{url}/health", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.3)
        yield url, port, folder
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # no upload was spooled to disk (multiprocessing's own pymp-* folder, its manager's socket, is left
        # when the engine's processes end slower than the 30 s above: seen under a full test run's load)
        assert not [name for name in os.listdir(folder / "tmp") if not name.startswith("pymp-")]


def caption_of(url, photo, **query):
    answer = requests.post(f"{url}/caption", files={"image": ("p.jpg", photo[1], "image/jpeg")}, params=query,
                           timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def still_serving(url, photo, expected):
    """/health answers and the real photo gets its caption, as before."""
    assert requests.get(f"{url}/health", timeout=10).json()["model_loaded"] is True
    assert caption_of(url, photo)["captions"][0]["caption"] == expected


@pytest.fixture(scope="module")
def first_caption(server, photo):
    return caption_of(server[0], photo)["captions"][0]["caption"]


def test_a_photo_gets_the_caption_generate_gives_with_the_model_and_time(server, checkpoint, photo, capsys):
    url, port, _ = server
    assert listening_addresses(port) == ["0100007F"]  # 127.0.0.1 only
    main.generate(img=photo[0], model_ckpt=checkpoint, n_best=2)
    expected = [line.split("\t")[1:] for line in capsys.readouterr().out.splitlines()]
    answer = caption_of(url, photo, n_best=2)
    assert [[c["caption"], f"{c['log_probability']:.3f}"] for c in answer["captions"]] == expected
    assert answer["decoding"]["decoding"] == "beam" and answer["decoding"]["n_best"] == 2 and answer["seconds"] > 0
    assert answer["checkpoints"][0]["checksum"] == main.load_checkpoint(checkpoint)["checksum"]
    raw = requests.post(f"{url}/caption", data=photo[1], headers={"content-type": "image/jpeg"}, timeout=60).json()
    assert raw["captions"][0] == answer["captions"][0]


def test_the_attention_map_comes_as_a_png_and_samples_follow_the_request(server, photo):
    answer = caption_of(server[0], photo, attention=1)
    assert Image.open(io.BytesIO(base64.b64decode(answer["attention_map"]))).format == "PNG"
    samples = caption_of(server[0], photo, decoding="sample", n_best=3, seed=4, temperature=1.5)
    assert len(samples["captions"]) == 3 and samples["decoding"]["temperature"] == 1.5
    assert samples == {**caption_of(server[0], photo, decoding="sample", n_best=3, seed=4, temperature=1.5),
                       "seconds": samples["seconds"], "batch": samples["batch"]}


def png_bomb():
    """A valid PNG that declares 100000 x 100000 pixels (a few hundred bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 1000))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def raw_request(port, head, body, close_after=None):
    """Send a request by hand -> the status line, or None when close_after cut the body (a client that leaves)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head + body[:close_after])
        if close_after is not None:
            return None
        return connection.recv(4096).split(b"\r\n")[0].decode()


HOSTILE = {
    "not an image": ({"files": {"image": ("x.jpg", b"hello, not a photo", "image/jpeg")}}, 400, "not a photo"),
    "truncated JPEG": ("truncated", 400, "not a photo"),
    "PNG bomb": ({"data": png_bomb(), "headers": {"content-type": "image/png"}}, 400, "DecompressionBomb"),
    "wrong content type": ({"data": b"x=1", "headers": {"content-type": "text/plain"}}, 415, "multipart/form-data"),
    "empty body": ({"data": b"", "headers": {"content-type": "image/jpeg"}}, 400, "empty"),
    "no image field": ({"files": {"photo": ("x.jpg", b"abc", "image/jpeg")}}, 400, "no field 'image'"),
    "too large": ({"data": b"\xff" * 3_000_000, "headers": {"content-type": "image/jpeg"}}, 413, "at most 2 MB"),
    "top_p out of range": ("top_p=2&decoding=sample", 400, "top_p=2.0: must be in (0, 1]"),
    "n_best above the limit": ("n_best=11&beam_size=11", 400, "at most 10"),
    "an option beam does not read": ("temperature=0.5", 400, "temperature is read by decoding=sample"),
    "unknown option": ("shell=rm", 400, "unknown option 'shell'"),
    "a bad decoding": ("decoding=telepathy", 400, "decoding=telepathy: choose one of"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_upload_is_one_json_line_and_the_server_goes_on(server, photo, first_caption, case):
    url = server[0]
    request, status, message = HOSTILE[case]
    if request == "truncated":
        request = {"files": {"image": ("t.jpg", photo[1][:len(photo[1]) // 2], "image/jpeg")}}
    elif isinstance(request, str):  # options in the query, a real photo
        request = {"files": {"image": ("p.jpg", photo[1], "image/jpeg")}, "params": request}
    answer = requests.post(f"{url}/caption", timeout=60, **request)
    assert answer.status_code == status and answer.headers["content-type"] == "application/json", answer.text
    assert message in answer.json()["error"] and "\n" not in answer.json()["error"], answer.json()
    still_serving(url, photo, first_caption)


def test_a_declared_200_mb_body_is_refused_before_it_is_sent_and_a_client_may_leave_mid_upload(server, photo,
                                                                                              first_caption):
    url, port, _ = server
    head = (b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 200000000\r\n\r\n")
    assert raw_request(port, head, b"\xff" * 1000).startswith("HTTP/1.1 413")
    leaving = b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
    for _ in range(5):
        raw_request(port, leaving % len(photo[1]), photo[1], close_after=len(photo[1]) // 3)
    time.sleep(0.5)
    assert requests.get(f"{url}/health", timeout=10).json()["in_flight"] == 0
    still_serving(url, photo, first_caption)


def test_a_thousand_requests_at_once_get_captions_or_503_and_none_is_lost(server, photo, first_caption):
    url = server[0]

    def send(_):
        answer = requests.post(f"{url}/caption", data=photo[1], headers={"content-type": "image/jpeg"}, timeout=120)
        return answer.status_code, answer.headers.get("retry-after"), answer.json()

    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(send, range(1000)))
    statuses = [status for status, _, _ in answers]
    # every request the queue (24) took is captioned; more only when some finish during the burst, which a
    # loaded machine's 1000 requests can outrun (2 of 3 full runs here: exactly 24)
    assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) >= 24, set(statuses)
    assert all(retry == "1" for status, retry, _ in answers if status == 503)
    assert {body["captions"][0]["caption"] for status, _, body in answers if status == 200} == {first_caption}
    assert max(body["batch"] for status, _, body in answers if status == 200) > 1  # captioned together
    still_serving(url, photo, first_caption)


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=3000) | st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]),
       content_type=st.sampled_from(["image/jpeg", "image/png", "application/json", "multipart/form-data", ""]),
       query=st.dictionaries(st.sampled_from(["n_best", "beam_size", "top_p", "temperature", "decoding", "seed", "x"]),
                             st.sampled_from(["0", "-1", "1e309", "nan", "2", "sample", "", "1e-300"]), max_size=3))
def test_any_upload_is_answered_with_captions_or_one_json_line(server, photo, first_caption, body, content_type,
                                                               query):
    answer = requests.post(f"{server[0]}/caption", data=body, params=query, timeout=60,
                           headers={"content-type": content_type} if content_type else {})
    assert answer.status_code in (200, 400, 413, 415), answer.text
    if answer.status_code != 200:
        assert answer.json()["error"] and "\n" not in answer.json()["error"]
    assert requests.get(f"{server[0]}/health", timeout=10).ok


def test_health_metrics_and_the_log_line_per_request(server, photo, first_caption):
    url, _, folder = server
    health = requests.get(f"{url}/health", timeout=10).json()
    assert health["model_loaded"] and health["in_flight"] == 0 and health["checkpoints"][0]["model"] == "attention"
    metrics = requests.get(f"{url}/metrics", timeout=10).json()
    assert metrics["answered"]["200"] >= 1
    assert re.search(r"POST /caption 200 \d+ ms", open(folder / "server.log").read())


@pytest.mark.slow
@pytest.mark.skipif(not (os.path.exists("/usr/bin/chromium") and os.path.isdir(os.path.join(ROOT, "node_modules"))),
                    reason="needs Debian chromium and `npm install` (install.sh installs both)")
def test_the_page_in_chromium_captions_a_chosen_photo(server, photo, first_caption):
    screenshot = os.path.join(ROOT, "tests", "artifacts", "serve.png")
    os.makedirs(os.path.dirname(screenshot), exist_ok=True)
    run = subprocess.run(["node", "tests/serve_check.js", server[0], photo[0], screenshot], cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    page = json.loads(run.stdout)
    assert page["captions"][0] == first_caption and page["attentionMap"] > 0
    assert "看图说话" in page["title"] and page["consoleErrors"] == [] and page["outsideRequests"] == []
    assert os.path.getsize(screenshot) > 10000
