"""`peftcli serve`: one live server (a subprocess on a free port, two adapters trained here, an API
key) driven by the official `openai` client and by raw HTTP: its answers are `peftcli generate`'s,
streamed or not; concurrent clients on different adapters never get another adapter's answer; bad
requests get OpenAI's error object and the right status, and the server keeps serving; SIGTERM lets
the request in flight finish and exits 143 (Ctrl-C: 130), never 0. `--engine vllm` is checked by the
command it builds."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from helpers import base_recipe, train, write_recipe

KEY = "sk-test-serve"
MODELS = ("base", "alpha", "beta")
PROMPTS = ("Which one follows July?", "Sum of seven and two?", "Before Saturday comes?")
TOKENS = 12


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """Two adapters that answer differently: other seeds, other learning rates, a few steps each."""
    tmp = tmp_path_factory.mktemp("serve")
    trained = {}
    for name, seed, rate in (("alpha", 3, 3e-2), ("beta", 11, 1e-2)):
        training = {"max_steps": 10, "batch_size": 8, "seed": seed, "learning_rate": rate, "save_steps": 10}
        recipe = base_recipe(tiny_model, tmp / name, data={"eval": None}, training=training)
        trained[name] = train(write_recipe(tmp / f"{name}.yaml", recipe)).run_dir
    return trained


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen, port: int, log: Path):
        self.process, self.port, self.log = process, port, log
        self.url = f"http://127.0.0.1:{port}"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _start(command: list[str], log: Path) -> Server:
    """A `peftcli serve` subprocess on a free port, its output in `log`."""
    port = _free_port()
    with log.open("wb") as out:
        process = subprocess.Popen([*command, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    return Server(process, port, log)


def _wait_healthy(live: Server) -> None:
    """Return once /health answers (the model has loaded)."""
    import httpx

    deadline = time.monotonic() + 90
    while True:
        assert live.process.poll() is None, f"the server exited {live.process.returncode}:\n{live.log_tail()}"
        assert time.monotonic() < deadline, f"no /health within 90 s:\n{live.log_tail()}"
        try:
            if httpx.get(f"{live.url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


SERVE = [sys.executable, "-m", "peftcli", "serve"]


@pytest.fixture(scope="module")
def server(runs, tiny_model, tmp_path_factory, request):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    adapters = [arg for name, run in runs.items() for arg in ("--adapter", f"{name}={run}")]
    live = _start([*SERVE, "--base", str(tiny_model), *adapters, "--api-key", KEY], log)
    request.getfixturevalue("expected")  # computed here while the server starts: the two overlap
    _wait_healthy(live)
    yield live
    if live.process.poll() is None:  # a test failed before the SIGTERM test
        live.process.kill()
        live.process.wait()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def session(runs, tiny_model):
    """The engine `peftcli generate` runs, in this process: what every answer is compared with."""
    from peftcli.evaluation.adapters import Session

    return Session(str(tiny_model), list(runs.items()))


def _adapter(model: str) -> str | None:
    return None if model == "base" else model


def _messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


@pytest.fixture(scope="module")
def expected(session) -> dict[tuple[str, str], str]:
    """Each model's greedy answer to each prompt, asked one after the other."""
    return {
        (model, prompt): session.reply(_adapter(model), _messages(prompt), stream=False, max_new_tokens=TOKENS)
        for model in MODELS
        for prompt in PROMPTS
    }


def _chat(client, model: str, prompt: str, stream: bool, **options) -> str:
    request = {"model": model, "messages": _messages(prompt), "max_tokens": TOKENS, "temperature": 0, **options}
    if not stream:
        return client.chat.completions.create(**request).choices[0].message.content
    chunks = client.chat.completions.create(**request, stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


@pytest.mark.slow
def test_models_lists_the_base_and_every_adapter(client, runs, tiny_model):
    listed = {model.id: model for model in client.models.list()}
    assert list(listed) == list(MODELS)
    assert listed["alpha"].model_extra["root"] == str(runs["alpha"]) and listed["alpha"].model_extra["parent"] == "base"
    assert listed["base"].model_extra["root"] == str(tiny_model)
    assert client.models.retrieve("beta").id == "beta"


@pytest.mark.slow
def test_chat_answers_are_peftcli_generates_streamed_or_not(client, cli, runs, tiny_model):
    adapters = [arg for name, run in runs.items() for arg in ("--adapter", f"{name}={run}")]
    prompt = PROMPTS[0]
    common = ["--prompt", prompt, "--max-new-tokens", TOKENS, "--json"]
    generated = cli("generate", *adapters, *common).out + cli("generate", "--base", tiny_model, *common).out
    replies = {row["adapter"]: row["reply"] for row in map(json.loads, generated.splitlines())}
    assert set(replies) == set(MODELS) and len(set(replies.values())) == 3  # three different answers
    for model in MODELS:
        assert _chat(client, model, prompt, stream=False) == replies[model], model
        assert _chat(client, model, prompt, stream=True) == replies[model], model


@pytest.mark.slow
def test_usage_finish_reason_and_stop_strings(client, expected):
    answer = client.chat.completions.create(model="base", messages=_messages(PROMPTS[0]), max_tokens=3, temperature=0)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3
    assert answer.usage.prompt_tokens > 0 and answer.usage.total_tokens == answer.usage.prompt_tokens + 3
    full = expected[("base", PROMPTS[0])]  # the random base's long answer
    word = re.search(r"[A-Za-z]{2,}", full[3:]).group()  # stop at a word inside it
    for stream in (False, True):
        assert _chat(client, "base", PROMPTS[0], stream, stop=[word]) == full.split(word)[0].strip()
    chunks = list(
        client.chat.completions.create(
            model="alpha",
            messages=_messages(PROMPTS[1]),
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_completions_feed_the_raw_prompt(client, session):
    from peftcli.evaluation.generation import Prompt

    text = "Monday, Tuesday,"
    for model in MODELS:
        want = session.complete(_adapter(model), Prompt(text, text, None, False), max_new_tokens=TOKENS)
        request = {"model": model, "prompt": text, "max_tokens": TOKENS, "temperature": 0}
        assert client.completions.create(**request).choices[0].text == want, model
        streamed = "".join(c.choices[0].text for c in client.completions.create(**request, stream=True) if c.choices)
        assert streamed == want, model


@pytest.mark.slow
def test_concurrent_clients_on_different_adapters_get_their_own_answers(client, expected):
    """Adapter switching is state of the one shared model: requests arriving together must not
    see each other's adapter. Every answer is compared with the sequential one."""
    telling = [p for p in PROMPTS if len({expected[(m, p)] for m in MODELS}) == len(MODELS)]
    assert telling, "the adapters should answer differently, or this test proves nothing"
    jobs = [(model, prompt, stream) for model in MODELS for prompt in telling for stream in (False, True)] * 2
    random.Random(0).shuffle(jobs)
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda job: _chat(client, *job), jobs))
    wrong = [(job, answer) for job, answer in zip(jobs, answers) if answer != expected[job[:2]]]
    assert wrong == []


def _long(words: int) -> str:
    return " ".join(["Monday"] * words)


CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]
# (name, method, path, body (dict: JSON; bytes: sent as is), headers, status, param, code)
BAD_REQUESTS = [
    ("unknown model", "POST", CHAT, {"model": "gamma", "messages": HELLO}, None, 404, "model", "model_not_found"),
    ("malformed JSON", "POST", CHAT, b'{"model": "base", "messages": [', None, 400, None, "invalid_json"),
    ("not an object", "POST", CHAT, b"[1, 2]", None, 400, None, "invalid_json"),
    ("no messages", "POST", CHAT, {"model": "base"}, None, 400, "messages", "missing_required_parameter"),
    ("no model", "POST", CHAT, {"messages": HELLO}, None, 400, "model", "missing_required_parameter"),
    ("empty messages", "POST", CHAT, {"model": "base", "messages": []}, None, 400, "messages", "invalid_value"),
    (
        "a tool message",
        "POST",
        CHAT,
        {"model": "base", "messages": [{"role": "tool", "content": "x"}]},
        None,
        400,
        "messages.0.role",
        "invalid_value",
    ),
    (
        "an image",
        "POST",
        CHAT,
        {"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        None,
        400,
        "messages.0.content",
        "invalid_value",
    ),
    (
        "negative temperature",
        "POST",
        CHAT,
        {"model": "base", "messages": HELLO, "temperature": -1},
        None,
        400,
        "temperature",
        "invalid_value",
    ),
    (
        "several choices",
        "POST",
        CHAT,
        {"model": "base", "messages": HELLO, "n": 3},
        None,
        400,
        "n",
        "unsupported_parameter",
    ),
    (
        "tools",
        "POST",
        CHAT,
        {"model": "alpha", "messages": HELLO, "tools": [{"type": "function"}]},
        None,
        400,
        "tools",
        "unsupported_parameter",
    ),
    (
        "prompt over the context",
        "POST",
        CHAT,
        {"model": "alpha", "messages": [{"role": "user", "content": _long(600)}]},
        None,
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "reply over the context",
        "POST",
        CHAT,
        {"model": "beta", "messages": HELLO, "max_tokens": 600},
        None,
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "raw prompt over the context",
        "POST",
        "/v1/completions",
        {"model": "base", "prompt": _long(600)},
        None,
        400,
        "prompt",
        "context_length_exceeded",
    ),
    (
        "several prompts",
        "POST",
        "/v1/completions",
        {"model": "base", "prompt": ["a", "b"]},
        None,
        400,
        "prompt",
        "invalid_value",
    ),
    ("no key", "POST", CHAT, {"model": "base", "messages": HELLO}, {}, 401, None, "invalid_api_key"),
    (
        "wrong key",
        "GET",
        "/v1/models",
        None,
        {"Authorization": "Bearer sk-wrong"},
        401,
        None,
        "invalid_api_key",
    ),
    ("unknown route", "GET", "/v1/nothing", None, None, 404, None, "not_found"),
    ("wrong method", "GET", CHAT, None, None, 405, None, None),
    ("huge body", "POST", CHAT, b"x" * (9 * 2**20), None, 413, None, "request_too_large"),
]


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, expected):
    import httpx

    with httpx.Client(base_url=server.url, timeout=30) as http:
        for name, method, path, body, headers, status, param, code in BAD_REQUESTS:
            sent = {"Authorization": f"Bearer {KEY}"} if headers is None else headers
            content = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
            response = http.request(method, path, content=content, headers=sent)
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], name
            assert (error["param"], error["code"]) == (param, code), (name, error)
            assert error["type"] == "invalid_request_error", name
        assert http.get("/health").status_code == 200  # no key needed
    assert _chat(client, "alpha", PROMPTS[0], stream=False) == expected[("alpha", PROMPTS[0])]


@pytest.mark.slow
def test_the_openai_client_raises_its_own_errors(client, server):
    import openai

    with pytest.raises(openai.NotFoundError, match="gamma"):
        client.chat.completions.create(model="gamma", messages=HELLO)
    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


@pytest.mark.slow
def test_a_port_in_use_is_refused_before_loading_anything(cli, server, runs):
    result = cli("serve", "--adapter", f"alpha={runs['alpha']}", "--port", server.port)
    assert result.code == 2 and f"--port {server.port}" in result.error_lines[0]


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_and_exits_143(client, server):
    """Last in this module: it stops the server. A stopped server is interrupted, not done: exit 0
    would let `peftcli serve ... && next-step` carry on as if a job had finished."""
    stream = client.chat.completions.create(
        model="base",
        messages=_messages(PROMPTS[0]),
        max_tokens=100,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = iter(stream)
    next(chunks)  # generation has begun
    stopped = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert rest[-1].usage.completion_tokens == 100 and rest[-2].choices[0].finish_reason == "length"
    assert server.process.wait(timeout=30) == 143, server.log_tail()
    assert time.monotonic() - stopped < 20
    said = [line for line in server.log_tail().splitlines() if line.startswith("interrupted:")]
    assert len(said) == 1 and "SIGTERM" in said[0] and "nothing was lost" in said[0], server.log_tail()


@pytest.mark.slow
def test_ctrl_c_stops_an_idle_server_with_exit_130(tiny_model, tmp_path):
    live = _start([*SERVE, "--base", str(tiny_model)], tmp_path / "server.log")
    try:
        _wait_healthy(live)
        live.process.send_signal(signal.SIGINT)
        assert live.process.wait(timeout=30) == 130, live.log_tail()
    finally:
        if live.process.poll() is None:
            live.process.kill()
            live.process.wait()
    said = [line for line in live.log_tail().splitlines() if line.startswith("interrupted:")]
    assert len(said) == 1 and "SIGINT" in said[0] and "nothing was lost" in said[0], live.log_tail()
    assert "Traceback" not in live.log_tail()


# --engine vllm: the command it builds, and what it refuses.


def test_the_vllm_command_serves_every_adapter_under_its_name(tmp_path):
    from peftcli.serve.vllm import VllmAdapter, vllm_command

    odd = tmp_path / "a=b"  # a path vLLM's NAME=PATH form cannot carry
    adapters = [VllmAdapter("support", tmp_path / "s", 8), VllmAdapter("sales", odd, 24)]
    command = vllm_command("org/model", adapters, host="127.0.0.1", port=9000, chat_template=tmp_path / "t.jinja")
    assert command[:3] == ["vllm", "serve", "org/model"]

    def option(name: str) -> str:
        return command[command.index(name) + 1]

    assert option("--served-model-name") == "base" and option("--port") == "9000" and "--enable-lora" in command
    assert option("--max-loras") == "2" and option("--max-lora-rank") == "32"  # 24, rounded up to vLLM's next
    assert option("--chat-template") == str(tmp_path / "t.jinja")
    modules = command[command.index("--lora-modules") + 1 :]
    assert modules[0] == f"support={tmp_path / 's'}"
    assert json.loads(modules[1]) == {"name": "sales", "path": str(odd)}
    assert "--enable-lora" not in vllm_command("org/model", [], host="::1", port=1)


def test_vllm_serves_plain_lora_and_names_the_way_for_the_rest(tmp_path, tiny_model):
    from peftcli.recipe import load_recipe
    from peftcli.serve.vllm import unservable

    def refusal(peft: dict):
        recipe = {**base_recipe(tiny_model, tmp_path / "o"), "peft": peft}
        recipe = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
        return unservable("x", tmp_path / "run", recipe)

    assert refusal({"method": "lora", "use_rslora": True}) is None
    dora = refusal({"method": "dora"})
    assert "DoRA" in dora.message and "peftcli merge" in dora.hint
    assert "modules_to_save" in refusal({"method": "lora", "modules_to_save": ["lm_head"]}).message
    ia3 = refusal({"method": "ia3"})
    assert "ia3" in ia3.message and "peftcli merge" in ia3.hint
    prompt = refusal({"method": "prompt_tuning"})
    assert "merge" not in prompt.hint and "built-in engine" in prompt.hint  # nothing to fold it into
    assert "--base" in refusal({"method": "full"}).hint


@pytest.mark.slow
def test_serve_engine_vllm_checks_the_runs_then_runs_vllm(cli, runs, tmp_path, monkeypatch):
    adapters = [arg for name, run in runs.items() for arg in ("--adapter", f"{name}={run}")]
    if importlib.util.find_spec("vllm") is None:
        result = cli("serve", "--engine", "vllm", *adapters)
        assert result.code == 2 and "vLLM is not installed" in result.error_lines[0]
        assert "pip install vllm" in result.err

    dora = tmp_path / "dora-run"
    shutil.copytree(runs["alpha"], dora)
    recipe = yaml.safe_load((dora / "recipe.yaml").read_text())
    recipe["peft"] = {**recipe["peft"], "method": "dora", "use_dora": True}
    (dora / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = cli("serve", "--engine", "vllm", *adapters, "--adapter", f"d={dora}")
    assert result.code == 2 and "--adapter d" in result.error_lines[0] and "DoRA" in result.err
    assert "peftcli merge" in result.err

    real_find_spec, launched = importlib.util.find_spec, {}
    installed = lambda name, *args: object() if name == "vllm" else real_find_spec(name, *args)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", installed)
    monkeypatch.setattr(os, "execvpe", lambda file, argv, env: launched.update(argv=argv, env=env))
    assert cli("serve", "--engine", "vllm", *adapters, "--port", "9001", "--api-key", "sk-secret").code == 0
    argv = launched["argv"]
    assert argv[1:3] == ["serve", recipe["model"]["name"]] and "--enable-lora" in argv
    assert f"alpha={runs['alpha'] / 'adapter'}" in argv and f"beta={runs['beta'] / 'adapter'}" in argv
    assert argv[argv.index("--max-lora-rank") + 1] == "8" and argv[argv.index("--port") + 1] == "9001"
    assert argv[argv.index("--chat-template") + 1] == str(runs["alpha"] / "adapter" / "chat_template.jinja")
    assert launched["env"]["VLLM_API_KEY"] == "sk-secret" and "sk-secret" not in argv
