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
    ``content``). ``finish_reason``: ``"length"`` when the LLM wrote ``max_tokens`` tokens without ending its reply,
    else ``"stop"`` (a forced signal group appended after the reply does not count against ``max_tokens``; one the
    LLM wrote does); ``usage`` counts the LLM's tokens (media placeholders and signal tokens included).

    ``stream=true``: server-sent events ``data: {chat.completion.chunk}``: a first chunk with ``delta.role``, one
    chunk per piece of text as the LLM writes it (``delta.content``), a last chunk with ``finish_reason`` whose
    delta holds the media (``content`` parts and ``audio``, as above), a usage chunk when asked, then
    ``data: [DONE]``. The text pieces add up to the non-streamed text.
``POST /v1/images/generations``
    DALL-E's shape: ``{prompt, n, size, response_format: "b64_json", seed, num_inference_steps, guidance_scale}`` ->
    ``{"created", "data": [{"b64_json": <PNG>}]}``; image ``i`` is ``seed + i``'s, what a chat request with
    ``modalities: ["text", "image"]`` renders. ``response_format: "url"`` is refused (the server serves no files
    but its own video jobs' MP4s, below).
``POST /v1/videos``, ``GET /v1/videos``, ``GET`` / ``DELETE /v1/videos/{id}``, ``GET /v1/videos/{id}/content``
    OpenAI's Videos API, the subset SGLang's diffusion server serves, so ``client.videos.create / retrieve / list /
    download_content / delete`` of the ``openai`` package work unchanged (``anygpt.apps.server.videos``). Create
    takes a JSON body or the ``openai`` client's multipart form: ``prompt``, ``model``, ``size`` ("WxH", as the
    images route reads and checks it; default: the video decoder's), ``seconds`` (a number or OpenAI's string,
    ``"4"``: ``max(1, round(seconds * fps))`` frames at the decoder's fps) or ``num_frames`` (not both; default:
    the decoder's), ``seed``, ``num_inference_steps``, ``guidance_scale``, ``decoder_overrides``, ``adapters``
    (nested fields need a JSON body); ``input_reference`` is refused. It queues a video-forced request (what a chat
    request with ``modalities: ["text", "video"]`` renders) in the worker's queue, as the other routes do (429 /
    503 when full / stopped), and answers at once with the Video object: ``{"id": "video_<32 hex>", "object":
    "video", "status": "queued", "progress": 0, "created_at", "completed_at": null, "model", "prompt", "seconds":
    "<frames / fps>", "size": "WxH", "error": null, "expires_at": null, "remixed_from_video_id": null}``. Its
    ``status`` goes ``queued`` -> ``in_progress`` (the worker took it) -> ``completed`` (``progress`` 100, the MP4
    written) or ``failed`` (``error: {"code": "invalid_request" | "internal_error" | "no_video", "message"}``; the
    server goes on serving). ``GET /v1/videos`` lists them (``limit`` 1..100, default 20; ``order`` ``desc``,
    the default, or ``asc``; ``after``: an id) as ``{"object": "list", "data", "first_id", "last_id",
    "has_more"}``. ``/content`` is the H.264 MP4 (``video/mp4``; ``variant`` other than ``video`` is 400); before
    the job completed it is 404 with code ``video_not_ready`` (what OpenAI answers), 404 ``video_failed`` for a
    failed job. ``DELETE`` answers ``{"id", "object": "video.deleted", "deleted": true}`` in any state (a queued
    job is dropped, a running one's result discarded) and removes the MP4. An unknown or malformed id is 404
    ``video_not_found``; a model without a video decoder answers ``POST /v1/videos`` with 400
    ``video_not_supported``. Jobs are kept in memory, at most ``--max-videos`` (default 100): past it the oldest
    finished ones are dropped with their files. MP4s are written atomically into the server's private folder
    (made under ``--video-dir`` or the system's temporary folder, removed when the server stops) and served only
    from there, found by the job, never by a path from the client. With Ray Serve each replica keeps its own
    jobs: ask the replica that made a job (one replica, or sticky sessions) for it.

Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad field or an unreadable media
part (``param`` names it, e.g. ``messages[0].content[1]``), 401 for a missing or wrong key (``--api-key``), 404 for
another model's name, an unknown route or video id, 413 for a body over ``--max-request-mb``, 429 when ``--queue-size``
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
