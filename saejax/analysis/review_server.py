"""The review's HTTP server (the standard library's, threaded; localhost by default):

    GET  /                       the index (blind: the numbered pages; open: the dashboard's
                                 index with the score and labels)
    GET  /latents/<i>.html       a latent's page with the rating panel (open review)
    GET  /items/<n>.html         the n-th page of a blind review
    GET  /api/ratings?rater=R[&item=T]   R's latest rating of page T, or of every page
    GET  /api/score              the score and labels (ratings.ReviewSummary) as JSON
    POST /api/ratings            {item, rating, label, rater}: appended to ratings.jsonl
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import re
import urllib.parse
from typing import TYPE_CHECKING

from absl import logging

if TYPE_CHECKING:  # review.py imports this module to serve; only the annotations need it
    from saejax.analysis.review import Review


_PAGE = re.compile(r"^/(latents|items)/([0-9]+)\.html$")
MAX_BODY = 16_384  # bytes of a rating


def _no_nan(value):
    """JSON has no NaN (a fraction of nothing rated): None instead."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value


def _handler(review: Review):
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "saejax-review"

        def log_message(self, format, *args):  # pylint: disable=redefined-builtin
            logging.debug("review: " + format, *args)

        def _send(self, status: int, body: str, content_type: str) -> None:
            data = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", f"{content_type}; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def _json(self, value, status: int = 200) -> None:
            self._send(status, json.dumps(_no_nan(value), allow_nan=False), "application/json")

        def do_GET(self):  # noqa: N802 (http.server's name)
            url = urllib.parse.urlsplit(self.path)
            query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
            if url.path in ("/", "/index.html"):
                return self._send(200, review.index_html(), "text/html")
            page = _PAGE.match(url.path)
            if page and (page.group(1) == "items") == review.blind:
                html = review.page_html(page.group(2))
                if html is not None:
                    return self._send(200, html, "text/html")
            if url.path == "/api/ratings":
                rater = query.get("rater", "")
                if "item" in query:
                    return self._json(review.rating_of(query["item"], rater))
                return self._json({"items": review.ratings_of(rater)})
            if url.path == "/favicon.ico":  # the pages have none; the browser asks anyway
                self.send_response(204)
                self.end_headers()
                return None
            if url.path == "/api/score":
                return self._json(dataclasses.asdict(review.summary()))
            return self._send(404, f"{url.path}: no such page in this review.", "text/plain")

        def do_POST(self):  # noqa: N802
            if urllib.parse.urlsplit(self.path).path != "/api/ratings":
                return self._send(404, "POST a rating to /api/ratings.", "text/plain")
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                return self._send(400, f"a rating is a JSON object of at most {MAX_BODY} "
                                       "bytes.", "text/plain")
            try:
                body = json.loads(self.rfile.read(length))
                if not isinstance(body, dict):
                    raise ValueError("a rating is a JSON object.")
                return self._json(review.rate(body))
            except ValueError as e:  # json.JSONDecodeError is one
                return self._send(400, str(e), "text/plain")

    return Handler


def make_server(review: Review, host: str = "127.0.0.1",
                port: int = 8000) -> http.server.ThreadingHTTPServer:
    """The server of `review`, bound (port 0: any free one) but not yet serving."""
    return http.server.ThreadingHTTPServer((host, port), _handler(review))
