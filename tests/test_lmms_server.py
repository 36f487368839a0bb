"""lmms-eval's OpenAI-compatible model (``--model openai_compatible``) against a running ``anygpt serve``.

The real command serves the shipped ``toyworld`` model on a free loopback port with text-only replies; lmms-eval runs a
local task (a JSON file of toy-world pictures and a text question) through its chat model and, with
``--force_simple``, through its simple one (which sends the question before the picture). The toy world's answers are
known: a picture of a red circle is answered "It is a red circle.", so the predictions are checked word for word.

lmms-eval 0.7.3 cannot share the project's environment (it pins av < 16 and, through wandb, protobuf < 7): these
tests skip without it and run in ``.venv-lmms`` (``make test-lmms``, which fails on a skip).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from serving import free_port  # tests/serving.py

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (optional extra 'lmms', own environment)")

KEY = "lmms-key"
TASK = "anygpt_served_toys"
# (colour, shape) of the pictures; the toy world's captions name both, e.g. "It is a red circle."
PICTURES = [("red", "circle"), ("blue", "square"), ("yellow", "triangle"), ("green", "circle")]

_TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 16
  temperature: 0
process_results: !function utils.process_results
metric_list:
  - metric: correct
    aggregation: mean
    higher_is_better: true
"""

_TASK_UTILS = """def doc_to_visual(doc):
    return [doc["image"]] if doc["image"] else []


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"correct": float(doc["answer"] in results[0])}
"""


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory) -> Path:
    """A local lmms-eval task: four toy-world pictures to describe and one text-only greeting."""
    from toyworld.world import ImageItem

    folder = tmp_path_factory.mktemp("lmms_task")
    docs = []
    for colour, shape in PICTURES:
        path = folder / f"{colour}_{shape}.png"
        Image.fromarray(ImageItem(colour, shape).render()).save(path)
        docs.append({"question": "what is in this image?", "image": str(path), "answer": f"It is a {colour} {shape}."})
    docs.append({"question": "hello", "image": "", "answer": "Hello!"})
    (folder / "docs.json").write_text(json.dumps(docs))
    (folder / "tasks").mkdir()
    (folder / "tasks" / "utils.py").write_text(_TASK_UTILS)
    (folder / "tasks" / f"{TASK}.yaml").write_text(_TASK_YAML.format(task=TASK, data=folder / "docs.json"))
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> str:
    """``anygpt serve --model toyworld`` in its own process on a free loopback port; yields the base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-m", "anygpt", "serve", "--model", "toyworld", "--port", str(port), "--api-key", KEY,
               "--default-modalities", "text", "--max-batch-size", "4"]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            tail = log_path.read_text()[-3000:]
            assert process.poll() is None, f"anygpt serve exited ({process.returncode}):\n{tail}"
            assert time.monotonic() < deadline, f"anygpt serve did not start:\n{tail}"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


def _run_lmms_eval(url: str, task_dir: Path, out: Path, *extra: str) -> dict:
    """lmms-eval's OpenAI-compatible model on the local task; its results and logged samples."""
    model_args = f"model_version=toyworld,base_url={url}/v1,api_key={KEY},max_retries=1,num_concurrent=4"
    command = [sys.executable, "-m", "lmms_eval", "--model", "openai_compatible", "--model_args", model_args,
               "--tasks", TASK, "--include_path", str(task_dir / "tasks"), "--output_path", str(out), "--log_samples",
               "--batch_size", "4", *extra]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(out / "hf")}
    for name in ("OPENAI_API_KEY", "OPENAI_API_BASE", "OPENAI_BASE_URL"):  # the model_args are the only address
        env.pop(name, None)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=out.parent)
    results = [json.loads(p.read_text()) for p in out.rglob("*results.json")]  # lmms-eval exits 0 on errors
    assert done.returncode == 0 and results, done.stdout[-3000:] + done.stderr[-3000:]
    samples = [json.loads(line) for p in out.rglob("*samples_*.jsonl") for line in p.read_text().splitlines()]
    return {"results": results[0]["results"][TASK], "samples": samples}


def _reply(sample: dict) -> str:
    reply = sample["filtered_resps"]
    while isinstance(reply, list):  # one response per request
        (reply,) = reply
    return reply


@pytest.mark.parametrize("flavour", ["chat", "simple"])
def test_lmms_eval_openai_compatible_model_scores_anygpt_serve(served, toy_task, tmp_path, flavour):
    extra = ["--force_simple"] if flavour == "simple" else []
    run = _run_lmms_eval(served, toy_task, tmp_path / "out", *extra)
    replies = {sample["target"]: _reply(sample) for sample in run["samples"]}
    assert len(run["samples"]) == len(PICTURES) + 1
    for colour, shape in PICTURES:  # the served model's own captions, each picture's colour and shape
        assert replies[f"It is a {colour} {shape}."] == f"It is a {colour} {shape}."
    assert replies["Hello!"].startswith("Hello! I can draw shapes")
    assert run["results"]["correct,none"] == 1.0
