"""A real chat-completions server on loopback for the tests, backed by a tiny model.

It speaks the OpenAI protocol over real sockets (stdlib ThreadingHTTPServer) and can be
told to misbehave: each entry of `faults` is used by one request, in order:

    "429"   Too Many Requests, with Retry-After: 0
    "429w"  Too Many Requests, with Retry-After: 0.4 (seconds to wait)
    "400"   Bad Request (this request is refused; not retryable)
    "500"   Internal Server Error
    "503"   Service Unavailable
    "drop"  close the connection without a reply
    "slow"  reply after `slow_s` seconds (past a short client timeout)
    "401"   Unauthorized (not retryable)
    "drip"  a 200 reply whose body comes one byte every `drip_s` seconds
    "echo"  501 (stops the run) whose error body echoes the request's Authorization header
            and carries terminal escape sequences, as a careless gateway might; "echo400"
            the same as a 400 (the prompt's row records the error)
    "usage_str" / "usage_list"   a 200 reply whose usage is a string / a list
    "no_content"                 a 200 reply with no message content
    "few_logprobs"  (/v1/completions) one ranked log-prob fewer than asked at every position
    "add_bos"       (/v1/completions) scores the prompt with a BOS put in front, as a server that adds
                    special tokens would: log-probs of another sequence than the ids sent

`/v1/completions` with `prompt_logprobs: k` and the prompt as token ids answers as vLLM does:
for every position after the first, the k most likely tokens (ranks 1..k) and the position's
own token with its rank, from the model's raw (temperature 1) log-softmax.
"""

import json
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from distill.training.rollout import Sampling, rollout


class ChatServer:
    def __init__(
        self, model, tokenizer, api_key: str | None = None, delay_s: float = 0.0, slow_s: float = 3.0, drip_s: float = 0.2
    ):
        self.model, self.tokenizer = model, tokenizer
        self.api_key, self.delay_s, self.slow_s, self.drip_s = api_key, delay_s, slow_s, drip_s
        self.dripped = 0  # body bytes the "drip" fault got out before the client hung up
        self.faults: deque[str] = deque()
        self.requests: list[dict] = []  # {"headers", "body", "fault"}
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server.lock:
                    fault = server.faults.popleft() if server.faults else None
                    server.requests.append({"headers": dict(self.headers), "body": body, "fault": fault})
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server.handle(self, body, fault)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that hung up early: expected here
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def reply(self, handler, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)

    def drip(self, handler) -> None:
        """A valid reply, one byte every drip_s seconds (a stalled gateway, a slowloris)."""
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": "x" * 200}, "finish_reason": "stop"}]})
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        try:
            for byte in data.encode():
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
                self.dripped += 1
                time.sleep(self.drip_s)
        except OSError:  # the client gave up
            pass

    def prompt_logprobs(self, handler, body: dict, fault: str | None) -> None:
        ids, k = list(body["prompt"]), int(body["prompt_logprobs"])
        if fault == "add_bos":
            ids = [self.tokenizer.bos_token_id, *ids]
        with self.lock, torch.no_grad():
            log_p = torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)  # (T, V)
        entries = [None]
        for j in range(1, len(ids)):
            row = log_p[j - 1]
            top = row.topk(k - (fault == "few_logprobs"))
            own = ids[j]
            entry = {str(t): {"logprob": v, "rank": r + 1} for r, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist()))}
            if str(own) not in entry and own < row.numel():
                entry[str(own)] = {"logprob": row[own].item(), "rank": int((row > row[own]).sum()) + 1}
            entries.append(entry)
        self.reply(handler, 200, {"object": "text_completion", "model": body.get("model"),
                                  "choices": [{"index": 0, "text": "", "prompt_logprobs": entries, "finish_reason": "length"}]})

    def handle(self, handler, body: dict, fault: str | None) -> None:
        if handler.path == "/v1/completions" and fault not in ("drop", "429", "500", "503", "401"):
            if self.api_key and handler.headers.get("Authorization") != f"Bearer {self.api_key}":
                return self.reply(handler, 401, {"error": {"message": "invalid api key"}})
            return self.prompt_logprobs(handler, body, fault)
        if handler.path not in ("/v1/chat/completions", "/v1/completions"):
            return self.reply(handler, 404, {"error": {"message": f"no route {handler.path}"}})
        if fault == "drop":
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault in ("429", "500", "503"):
            return self.reply(handler, int(fault), {"error": {"message": "injected"}}, {"Retry-After": "0"})
        if fault == "429w":
            return self.reply(handler, 429, {"error": {"message": "slow down"}}, {"Retry-After": "0.4"})
        if fault == "400":
            return self.reply(handler, 400, {"error": {"message": "prompt too long"}})
        if fault == "slow":
            time.sleep(self.slow_s)
        if fault == "drip":
            return self.drip(handler)
        if fault in ("echo", "echo400"):  # a plain-text body with raw escape bytes in it
            auth = handler.headers.get("Authorization", "")
            data = f"\x1b[2J\x1b]0;pwned\x07bad gateway \x9b31m; you sent {auth}\r\nretry later".encode()
            handler.send_response(501 if fault == "echo" else 400)
            handler.send_header("Content-Type", "text/plain; charset=utf-8")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            return handler.wfile.write(data)
        if fault in ("usage_str", "usage_list", "no_content"):
            usage = "n/a" if fault == "usage_str" else [1, 2]
            message = {"role": "assistant"} if fault == "no_content" else {"role": "assistant", "content": "1+1=2#2"}
            return self.reply(handler, 200, {"choices": [{"message": message, "finish_reason": "stop"}], "usage": usage})
        if fault == "401" or (self.api_key and handler.headers.get("Authorization") != f"Bearer {self.api_key}"):
            return self.reply(handler, 401, {"error": {"message": "invalid api key"}})
        time.sleep(self.delay_s)
        prompt = body["messages"][-1]["content"]
        ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        sampling = Sampling(int(body.get("max_tokens", 16)), float(body.get("temperature", 1.0)), int(body.get("top_k", 0)), float(body.get("top_p", 1.0)))
        with self.lock:  # one generation at a time: the tiny model is shared
            done = rollout(self.model, [ids], sampling, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, [int(body.get("seed", 0))])
        text = self.tokenizer.decode(done.completions[0], skip_special_tokens=True)
        self.reply(handler, 200, {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop" if done.ended[0] else "length"}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(done.completions[0]),
                      "total_tokens": len(ids) + len(done.completions[0])},
        })


def tiny_chat_model(seed: int = 0):
    """A tiny random llama over the built-in task's tokenizer."""
    from distill.data.tasks.tokenizer import chain_tokenizer
    from distill.models.loading import load_causal_lm

    tok = chain_tokenizer()
    torch.manual_seed(seed)
    config = {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
              "eos_token_id": tok.eos_token_id}
    return load_causal_lm(config=config), tok
