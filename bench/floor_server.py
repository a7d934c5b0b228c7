"""The benchmark's floor: the least an HTTP server can do around create_chat_completion.

    $ python bench/floor_server.py PORT '{"model_path": "...", "n_ctx": 4096, ...}'

One connection at a time on a raw socket, no framework, no validation, no auth: it reads a
request, calls Llama.create_chat_completion(stream=True) with the JSON body's arguments in the same
thread, and writes each chunk as an SSE event. What llmapiserver costs beyond this is its own.
"""

from __future__ import annotations

import json
import socket
import sys

import llama_cpp

HEADERS = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"


def read_request(conn: socket.socket) -> tuple[str, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next((int(l.split(":", 1)[1]) for l in lines if l.lower().startswith("content-length:")), 0)
    while len(body) < length:
        body += conn.recv(65536)
    return lines[0], body


def serve(port: int, llm: llama_cpp.Llama) -> None:
    listener = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = listener.accept()
        with conn:
            request_line, body = read_request(conn)
            if request_line.startswith("GET /health"):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                continue
            kwargs = json.loads(body)
            kwargs.pop("stream", None)
            conn.sendall(HEADERS)
            for chunk in llm.create_chat_completion(stream=True, **kwargs):
                conn.sendall(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            conn.sendall(b"data: [DONE]\n\n")


if __name__ == "__main__":
    serve(int(sys.argv[1]), llama_cpp.Llama(verbose=False, **json.loads(sys.argv[2])))
