"""``anygpt serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn), batched, scaled out on Ray Serve.

Routes (``anygpt.apps.server.app``):

``GET /health``
    ``{"status": "ok", "model", "replica": "host:pid", "queued", "running", "batches", "requests",
    "largest_batch", "max_batch_size"}`` (503 and ``"unavailable"`` while the worker is not running). No key needed.
``GET /v1/models``
    ``{"object": "list", "data": [{"id": <served name>, "object": "model", "created": 0, "owned_by": "anygpt"}]}``.
``POST /v1/chat/completions``
    ``messages``: ``system`` / ``developer`` (text: put before the next user message's text), ``user`` and
    ``assistant`` (earlier turns are the history; an assistant turn's text only). User content is a string or a
    list of parts: ``{"type": "text", "text"}``,
    ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``,
    ``{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"|"mp3"|"flac"|"ogg"}}``,
    ``{"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,..."}}``,
    ``{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}`` (a URL may also be bare base64;
    ``http(s)://`` URLs are refused: the server fetches nothing). ``modalities``: absent = the model decides,
    ``["text"]`` = text only, ``["text", "image", ...]`` = those media forced. ``temperature`` (absent: 0, greedy,
    anygpt's default, not OpenAI's 1), ``top_p``, ``max_completion_tokens`` / ``max_tokens`` (absent: 128),
    ``seed``, ``stream``, ``stream_options.include_usage``, ``audio: {"format": "wav"}``. Extra body fields:
    ``num_inference_steps``, ``guidance_scale``, ``size`` ("WxH"), ``num_frames``, ``audio_seconds``,
    ``decoder_overrides`` ({modality: {setting: value}}), ``adapters``. Unknown fields are refused (400 naming
    them); ``n`` must be 1; ``stop``, ``tools``, ``logprobs`` and penalties are refused when set.

    Response (``chat.completion``): ``choices[0].message.content`` is the text, or, when the reply has images or
    videos, a list ``[{"type": "text", "text"}, {"type": "image_url", "image_url": {"url":
    "data:image/png;base64,..."}}, ..., {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}]``
    (vllm-omni's shape; PNG images, H.264 MP4 videos). Audio: ``message.audio = {"id", "data": <base64 16-bit WAV>,
    "expires_at", "transcript": <the text>}`` (OpenAI's shape; a second audio comes as an ``audio_url`` part of
    ``content``). ``finish_reason``: ``"length"`` when ``max_tokens`` was reached, else ``"stop"``; ``usage``
    counts the LLM's tokens (media placeholders and signal tokens included).

    ``stream=true``: server-sent events ``data: {chat.completion.chunk}``: a first chunk with ``delta.role``, one
    chunk per piece of text as the LLM writes it (``delta.content``), a last chunk with ``finish_reason`` whose
    delta holds the media (``content`` parts and ``audio``, as above), a usage chunk when asked, then
    ``data: [DONE]``. The text pieces add up to the non-streamed text.
``POST /v1/images/generations``
    DALL-E's shape: ``{prompt, n, size, response_format: "b64_json", seed, num_inference_steps, guidance_scale}`` ->
    ``{"created", "data": [{"b64_json": <PNG>}]}``; image ``i`` is ``seed + i``'s, what a chat request with
    ``modalities: ["text", "image"]`` renders. ``response_format: "url"`` is refused (the server serves no files).

Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad field or an unreadable media
part (``param`` names it, e.g. ``messages[0].content[1]``), 401 for a missing or wrong key (``--api-key``), 404 for
another model's name or an unknown route, 413 for a body over ``--max-request-mb``, 429 when ``--queue-size``
requests already wait (``Retry-After: 1``), 503 while the worker is not running, 500 for a failure of the model
(logged). A bad request is refused before it reaches the model; a batch that fails is answered again one request
at a time, so only the request that breaks the model fails.

Batching (``anygpt.apps.server.worker``): one thread owns the pipeline; requests wait in a queue; up to
``--max-batch-size`` of them (those that arrive within ``--batch-wait-ms`` of the first) are answered by one
``AnyGPTPipeline.run_batch`` call: one LLM prefill and decoding loop for all, each decoder called once for the
batch's media of equal settings.
"""

from anygpt.apps.server.app import ServerOptions, build_app
from anygpt.apps.server.worker import BatchWorker, Job, JobResult

__all__ = ["BatchWorker", "Job", "JobResult", "ServerOptions", "build_app"]
