"""`main.py serve`: a trained captioner behind HTTP, loaded once, captioning concurrent photos together.

    POST /caption   a photo (multipart field `image`, or the body with an image/* type); options in the
                    query or form (decoding, n_best, beam_size, temperature, top_k, top_p,
                    diversity_groups, diversity_lambda, seed, attention=1) -> JSON captions
    GET  /          a page (Chinese, English beside it) to drop a photo on and read its captions
    GET  /health    the model, and the requests in the server now; GET /metrics: counts since it started

The batching is LitServe's (max_batch_size, batch_timeout): requests wait at most --batch-timeout for
others, and up to --max-batch-size photos are encoded and decoded as one batch by the model worker.
`Gate`, in front of it, answers everything that never needs the model: the page, health, and every
upload it refuses (too large, not an image, a bad option: 4xx JSON with one line; a full server: 503
with Retry-After). Uploads are read into memory and never written to disk.
"""
import base64
import collections
import dataclasses
import io
import json
import re
import socket
import sys
import time
import urllib.parse
from email.parser import BytesParser
from email.policy import HTTP

import litserve
import torch

import config
from captioning import caption_photos, load_captioners
from config import Config, UserError
from images import UNREADABLE, load_image, seen_image
from model import READS_REGIONS, find_checkpoints, load_checkpoint

# What a request may set, and the most it may ask for (a request never makes the server search wider).
REQUEST_OPTIONS = ("decoding", "n_best", "beam_size", "temperature", "top_k", "top_p", "diversity_groups",
                   "diversity_lambda", "seed")
MOST = {"n_best": 10, "beam_size": 10, "diversity_groups": 10}
PAGE = "serve_page.html"


class RequestError(Exception):
    """A request the server refuses: an HTTP status and one line."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status, self.headers = status, list(headers)


def request_options(opt: Config, fields):
    """A request's option fields (text) on top of the server's options -> (decoding Config, attention?)."""
    fields = dict(fields)
    attention = fields.pop("attention", "0").lower() in ("1", "true", "yes")
    unknown = sorted(set(fields) - set(REQUEST_OPTIONS))
    if unknown:
        raise RequestError(400, f"unknown option {unknown[0]!r}; a request may set {', '.join(REQUEST_OPTIONS)} "
                                "and attention")
    if "decoding" in fields:  # another method: the server's options of its own method do not carry over
        opt = dataclasses.replace(opt, **{name: config.FIELDS[name].default for name in config.READ_BY})
    try:
        opt = config.updated(opt, **fields)
        config.check_read_by_decoding(opt, "serve")
    except UserError as error:
        raise RequestError(400, str(error).replace("--", "").replace("-", "_")) from None
    for name, most in MOST.items():
        if getattr(opt, name) > most:
            raise RequestError(400, f"{name}={getattr(opt, name)}: a request may ask for at most {most}")
    return opt, attention


def read_upload(content_type, body, query):
    """The photo bytes and option fields of a request: a multipart form (field `image`, other fields
    options) or a body of an image/* type (options in the query)."""
    fields = dict(urllib.parse.parse_qsl(query))
    if content_type.startswith("multipart/form-data"):
        message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
                                                      + body)
        parts = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        if "image" not in parts:
            raise RequestError(400, "the form has no field 'image' holding the photo")
        fields.update((name, part.get_content()) for name, part in parts.items()
                      if name != "image" and isinstance(part.get_content(), str))
        body = parts["image"].get_payload(decode=True) or b""
    elif not content_type.startswith("image/"):
        raise RequestError(415, f"content type {content_type or 'none'!r}: send the photo as multipart/form-data "
                                "(field 'image') or as the body with an image/* type")
    if not body:
        raise RequestError(400, "the upload is empty: no photo")
    return body, fields


def open_photo(data):
    """The bytes of an uploaded photo -> an RGB PIL image, fully decoded (a truncated file, a decompression
    bomb or anything not an image is refused)."""
    try:
        return load_image(io.BytesIO(data))
    except UNREADABLE as error:
        reason = re.sub(r"\s*<_io.BytesIO object at \w+>", "", str(error))[:120]  # PIL names the file object
        raise RequestError(400, f"not a photo this server can read ({type(error).__name__}: {reason})") from None


@dataclasses.dataclass
class Counts:
    """What /health and /metrics tell: requests now in the server, and since it started by status."""

    in_flight: int = 0
    answered: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    seconds: float = 0.0


class Gate:
    """ASGI middleware before LitServe: serves the page, /health and /metrics; checks each POST /caption
    (size, type, photo, options) and hands LitServe only good ones, as JSON; logs a line per request."""

    def __init__(self, app, opt: Config, about: dict):
        self.app, self.opt, self.about, self.counts = app, opt, about, Counts()
        self.page = open(f"{__file__.rsplit('/', 1)[0]}/{PAGE}", "rb").read()
        self.most_bytes = int(opt.max_upload_mb * 1e6)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, route = time.perf_counter(), (scope["method"], scope["path"])
        status = await self.answer(scope, receive, send, route)
        seconds = time.perf_counter() - started
        self.counts.answered[status] += 1
        self.counts.seconds += seconds
        print(f"{scope['method']} {scope['path']} {status} {seconds * 1000:.0f} ms", file=sys.stderr, flush=True)

    async def answer(self, scope, receive, send, route):
        """Answer the request -> the status sent."""
        if route == ("GET", "/"):
            return await respond(send, 200, self.page, "text/html; charset=utf-8")
        if route == ("GET", "/health"):
            return await respond_json(send, 200, {"model_loaded": True, "in_flight": self.counts.in_flight,
                                                  "max_queue": self.opt.max_queue, **self.about})
        if route == ("GET", "/metrics"):
            return await respond_json(send, 200, {"in_flight": self.counts.in_flight,
                                                  "answered": dict(self.counts.answered),
                                                  "seconds": self.counts.seconds})
        if scope["path"] != "/caption":
            return await respond_json(send, 404, {"error": f"no page {scope['path']}; POST photos to /caption"})
        if scope["method"] != "POST":
            return await respond_json(send, 405, {"error": "POST a photo to /caption"})
        if self.counts.in_flight >= self.opt.max_queue:
            return await respond_json(send, 503, {"error": "the server is full; try again in a second"},
                                      [(b"retry-after", b"1")])
        self.counts.in_flight += 1
        try:
            return await self.caption(scope, receive, send)
        except RequestError as error:
            return await respond_json(send, error.status, {"error": str(error)}, error.headers)
        finally:
            self.counts.in_flight -= 1

    async def caption(self, scope, receive, send):
        """A checked upload handed to LitServe as {"image": base64, "options": {...}} -> the status sent."""
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        body = await self.read_body(headers, receive)
        if body is None:
            return 499  # the client left mid-upload: nobody to answer
        data, fields = read_upload(headers.get("content-type", ""), body, scope["query_string"].decode("latin-1"))
        opt, attention = request_options(self.opt, fields)
        open_photo(data)
        payload = json.dumps({"image": base64.b64encode(data).decode(), "attention": attention,
                              "options": {name: getattr(opt, name) for name in REQUEST_OPTIONS}}).encode()
        status, given = [], []

        async def passed_body():  # the checked request once, then the client's own messages (a disconnect)
            if given:
                return await receive()
            given.append(True)
            return {"type": "http.request", "body": payload, "more_body": False}

        async def sent(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        scope = {**scope, "headers": [(b"content-type", b"application/json"),
                                      (b"content-length", str(len(payload)).encode())]}
        await self.app(scope, passed_body, sent)
        return status[0] if status else 500

    async def read_body(self, headers, receive):
        """The request's body, at most --max-upload-mb (413 past it, before reading it all when its length is
        declared); None when the client disconnects first."""
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.most_bytes:
            raise RequestError(413, f"the upload is {int(declared) / 1e6:.1f} MB; at most {self.opt.max_upload_mb:g}"
                                    " MB (--max-upload-mb)")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.most_bytes:
                raise RequestError(413, f"the upload is over {self.opt.max_upload_mb:g} MB (--max-upload-mb)")
            if not message.get("more_body"):
                return b"".join(chunks)


async def respond_json(send, status, content, headers=()):
    return await respond(send, status, json.dumps(content, ensure_ascii=False).encode(), "application/json", headers)


async def respond(send, status, body, content_type, headers=()):
    """Send a whole response -> its status."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
    return status


class CaptionAPI(litserve.LitAPI):
    """The model worker: --model-ckpt loaded once; each batch of checked requests captioned together (the
    requests of one batch that ask for the same options in one call)."""

    def __init__(self, opt: Config, about: dict):
        super().__init__(max_batch_size=opt.max_batch_size, batch_timeout=opt.batch_timeout, api_path="/caption")
        self.opt, self.about = opt, about

    def setup(self, device):
        self.loaded = load_captioners(self.opt, torch.device(device))

    def decode_request(self, request):
        photo = load_image(io.BytesIO(base64.b64decode(request["image"])))
        return photo, dataclasses.replace(self.opt, **request["options"]), request["attention"]

    def batch(self, inputs):
        return inputs

    def predict(self, inputs):
        """[(photo, options, attention?)] (without batching, one of them) -> per photo its captions, with the
        batch's seconds and size."""
        if self.max_batch_size == 1:  # LitServe then hands over one request, not a list
            return self.caption([inputs])[0]
        return self.caption(inputs)

    def caption(self, inputs):
        started, groups = time.perf_counter(), collections.defaultdict(list)
        for index, (_, opt, _) in enumerate(inputs):
            groups[tuple(getattr(opt, name) for name in REQUEST_OPTIONS)].append(index)
        captions = [None] * len(inputs)
        for indices in groups.values():
            opt = inputs[indices[0]][1]
            for index, found in zip(indices, caption_photos(self.loaded, [inputs[i][0] for i in indices], opt)):
                captions[index] = found
        seconds = time.perf_counter() - started
        return [(found, photo, opt, attention, seconds, len(inputs))
                for found, (photo, opt, attention) in zip(captions, inputs)]

    def unbatch(self, outputs):
        return outputs

    def encode_response(self, output):
        found, photo, opt, attention, seconds, batch = output
        answer = {"captions": [{"caption": text, "log_probability": score} for text, score, _ in found],
                  "decoding": {name: getattr(opt, name) for name in REQUEST_OPTIONS},
                  "seconds": round(seconds, 4), "batch": batch, **self.about}
        if attention and found[0][2] is not None:
            from visualize import attention_figure
            png = io.BytesIO()
            attention_figure(seen_image(photo), found[0][2]).save(png, "PNG")
            answer["attention_map"] = base64.b64encode(png.getvalue()).decode()
        return answer


def about_model(opt: Config):
    """The checkpoints of --model-ckpt, each checked: [{path, model, checksum}] and whether any attends."""
    checkpoints = []
    for path in find_checkpoints(opt):
        checkpoint = load_checkpoint(path)
        checkpoints.append({"path": path, "model": checkpoint["config"].get("model", "pooled"),
                            "checksum": checkpoint.get("checksum", "")})
    return {"checkpoints": checkpoints, "attends": any(c["model"] in READS_REGIONS for c in checkpoints)}


def check_port(host, port):
    """Refuse a port another program holds, before the model loads."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"--host={host} --port={port}: cannot listen there ({error.strerror})") from None


def run(opt: Config):
    """Serve --model-ckpt until Ctrl-C."""
    about = about_model(opt)
    check_port(opt.host, opt.port)
    use_gpu = opt.use_gpu and torch.cuda.is_available()
    server = litserve.LitServer(CaptionAPI(opt, about), accelerator="cuda" if use_gpu else "cpu", devices=1,
                                middlewares=[(Gate, {"opt": opt, "about": about})], healthcheck_path="/ready",
                                disable_openapi_url=True)
    print(f"serving {', '.join(c['path'] for c in about['checkpoints'])} at http://{opt.host}:{opt.port}/ "
          "(Ctrl-C stops it)", file=sys.stderr, flush=True)
    server.run(host=opt.host, port=opt.port, generate_client_file=False, num_api_servers=1, log_level="warning",
               access_log=False)
