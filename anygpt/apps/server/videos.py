"""The video jobs of ``/v1/videos``: a bounded in-memory store and the MP4 files it owns.

A job is the worker's ``Job`` future with what the Video object reports (OpenAI's shape: ``id``, ``object: "video"``,
``status``, ``progress``, ``created_at``, ``completed_at``, ``model``, ``prompt``, ``seconds``, ``size``, ``error``).
Its status follows the future: ``queued`` while it waits in the worker's queue, ``in_progress`` from the moment the
worker takes it until its MP4 is written, then ``completed`` (the file is there) or ``failed`` (``error: {code,
message}``). When a job ends, a writer thread of the store (not the worker) writes its video with the project's MP4
writer, atomically, as ``<id>.mp4`` in the store's own folder: a private folder (``tempfile.mkdtemp``, mode 0700)
made when the server starts and removed, with every file in it, when it stops. Files are only ever found through a
job of the store: a client's id is matched against ``video_<32 hex digits>`` and looked up, never joined to a path.

The store keeps at most ``max_videos`` jobs: past that, the oldest finished ones (``completed`` or ``failed``, in the
order they were created) are dropped with their files; jobs still queued or running are never dropped (the worker's
queue bounds them). Deleting a job works in any state: a queued one is cancelled (the worker skips it), a running
one's result is discarded when it ends.
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from anygpt.base.errors import AnyGPTError, UsageError
from anygpt.base.media import save_video

logger = logging.getLogger(__name__)

__all__ = ["VIDEO_ID", "VideoRecord", "VideoStore"]

VIDEO_ID = re.compile(r"video_[0-9a-f]{32}")
"""What a video id looks like (``VideoStore.new_id``); anything else is an unknown id."""


@dataclass(eq=False)
class VideoRecord:
    """One job of ``/v1/videos``.

    Attributes:
        id: ``video_<32 hex digits>``, random (``VideoStore.new_id``).
        prompt, model: as asked (``model``: the served model's name).
        size: the frames' ``"WxH"``; seconds: the clip's length as OpenAI writes it (a string: frames / fps).
        created_at: Unix seconds.
        future: the worker job's future (a ``JobResult`` with the video, or the exception that ended it).
        status: ``"completed"`` or ``"failed"`` once finished; None before (then ``state`` follows the future).
        completed_at: Unix seconds when it finished.
        error: ``{"code", "message"}`` of a failed job.
        path: the MP4 of a completed job.
    """

    id: str
    prompt: str
    model: str
    size: str
    seconds: str
    created_at: int
    future: Future
    status: str | None = None
    completed_at: int | None = None
    error: dict[str, str] | None = None
    path: Path | None = None

    def state(self) -> str:
        """``queued``, ``in_progress``, ``completed`` or ``failed``."""
        if self.status is not None:
            return self.status
        return "in_progress" if self.future.running() or self.future.done() else "queued"

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's Video object (``progress``: 0 until completed, then 100; the worker reports no finer progress)."""
        status = self.state()
        return {
            "id": self.id,
            "object": "video",
            "model": self.model,
            "status": status,
            "progress": 100 if status == "completed" else 0,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "expires_at": None,
            "prompt": self.prompt,
            "remixed_from_video_id": None,
            "seconds": self.seconds,
            "size": self.size,
            "error": self.error,
        }


class VideoStore:
    """The jobs of ``/v1/videos`` and their MP4 files (see the module docstring).

    Args:
        max_videos: the most jobs kept; past it the oldest finished ones are dropped with their files.
        parent: where the store's private folder is made (None: the system's temporary folder).
    """

    def __init__(self, max_videos: int = 100, parent: str | None = None):
        if isinstance(max_videos, bool) or not isinstance(max_videos, int) or max_videos < 1:
            raise UsageError(f"max_videos must be a positive integer, got {max_videos!r}")
        self.max_videos = max_videos
        self.parent = parent
        self.folder: Path | None = None
        self._records: OrderedDict[str, VideoRecord] = OrderedDict()
        self._lock = threading.Lock()
        self._writer: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ life
    def start(self) -> VideoStore:
        """Make the private folder and the writer thread (once)."""
        if self.folder is None:
            if self.parent is not None:
                Path(self.parent).expanduser().mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix="anygpt-serve-videos-", dir=self.parent))
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="anygpt-serve-videos")
        return self

    def close(self) -> None:
        """Let the files being written finish, forget every job and remove the folder with its files."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        with self._lock:
            records = list(self._records.values())
            self._records.clear()
        for record in records:
            record.future.cancel()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    @staticmethod
    def new_id() -> str:
        return f"video_{secrets.token_hex(16)}"

    # ------------------------------------------------------------------ jobs
    def add(self, record: VideoRecord) -> dict[str, Any]:
        """Keep ``record`` (its MP4 is written when its future ends); returns its Video object."""
        if self.folder is None or self._writer is None:
            raise RuntimeError("the video store is not started")
        with self._lock:
            self._records[record.id] = record
            self._evict()
            described = record.to_dict()
        record.future.add_done_callback(partial(self._ended, record.id))
        return described

    def describe(self, video_id: str) -> dict[str, Any] | None:
        """The Video object of ``video_id``, or None for an unknown (or malformed) id."""
        with self._lock:
            record = self._get(video_id)
            return None if record is None else record.to_dict()

    def content(self, video_id: str) -> tuple[str, Path | None, dict[str, str] | None] | None:
        """``(state, MP4 path or None, error)`` of ``video_id``, or None for an unknown id."""
        with self._lock:
            record = self._get(video_id)
            return None if record is None else (record.state(), record.path, record.error)

    def page(self, *, after: str | None = None, limit: int = 20, order: str = "desc") -> tuple[list[dict], bool]:
        """The Video objects of one page of the list (newest first with ``order="desc"``) after the id ``after``,
        and whether more follow.

        Raises:
            KeyError: ``after`` is not a job of the store.
        """
        with self._lock:
            records = list(self._records.values())
            if order == "desc":
                records.reverse()
            if after is not None:
                ids = [record.id for record in records]
                if after not in ids:
                    raise KeyError(after)
                records = records[ids.index(after) + 1 :]
            return [record.to_dict() for record in records[:limit]], len(records) > limit

    def delete(self, video_id: str) -> bool:
        """Forget ``video_id`` and remove its file (a queued job is cancelled); False for an unknown id."""
        with self._lock:
            record = self._get(video_id)
            if record is None:
                return False
            del self._records[record.id]
        record.future.cancel()
        if record.path is not None:
            record.path.unlink(missing_ok=True)
        return True

    def __len__(self) -> int:
        return len(self._records)

    # ------------------------------------------------------------------ internals
    def _get(self, video_id: str) -> VideoRecord | None:
        if not isinstance(video_id, str) or VIDEO_ID.fullmatch(video_id) is None:
            return None
        return self._records.get(video_id)

    def _evict(self) -> None:
        """Drop the oldest finished jobs (and their files) past ``max_videos``; the lock is held."""
        while len(self._records) > self.max_videos:
            oldest = next((r for r in self._records.values() if r.status is not None), None)
            if oldest is None:
                return
            del self._records[oldest.id]
            if oldest.path is not None:
                oldest.path.unlink(missing_ok=True)

    def _ended(self, video_id: str, future: Future) -> None:
        """The job's future is done (in the worker's thread): write its MP4 in the store's writer thread."""
        if future.cancelled():
            return
        try:
            self._writer.submit(self._finish, video_id, future)
        except RuntimeError:  # the store is closing: nothing is kept
            pass

    def _finish(self, video_id: str, future: Future) -> None:
        """Mark the job failed, or write its MP4 and mark it completed (the file is removed if it was deleted)."""
        try:
            error = future.exception()
            if error is not None:
                if isinstance(error, AnyGPTError | ValueError):
                    self._fail(video_id, "invalid_request", str(error))
                else:
                    logger.error("video %s failed", video_id, exc_info=error)
                    self._fail(video_id, "internal_error", f"{type(error).__name__}: {error}")
                return
            videos = future.result().output.videos
            if not videos:
                self._fail(video_id, "no_video", "the model rendered no video")
                return
            with self._lock:
                if video_id not in self._records:
                    return
            target = self.folder / f"{video_id}.mp4"
            save_video(videos[0], target)
        except Exception as error:
            logger.error("cannot finish video %s", video_id, exc_info=error)
            self._fail(video_id, "internal_error", f"{type(error).__name__}: {error}")
            return
        with self._lock:
            record = self._records.get(video_id)
            if record is None:  # deleted while it was written
                target.unlink(missing_ok=True)
                return
            record.path, record.status, record.completed_at = target, "completed", int(time.time())
            self._evict()

    def _fail(self, video_id: str, code: str, message: str) -> None:
        lines = message.strip().splitlines()
        with self._lock:
            record = self._records.get(video_id)
            if record is not None:
                record.error = {"code": code, "message": lines[0] if lines else code}
                record.status, record.completed_at = "failed", int(time.time())
                self._evict()
