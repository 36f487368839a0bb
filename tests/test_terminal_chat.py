"""``anygpt chat``, driven through stdin (no terminal): multi-turn with one conversation, media attached by command,
media replies written and their paths printed, one error line and the chat goes on, EOF or /quit ends it."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest

from anygpt import cli
from anygpt.apps import terminal_chat
from anygpt.apps.terminal_chat import TerminalChat
from anygpt.base.media import load_audio, load_image
from anygpt.core.request import GenerationRequest

FAST = GenerationRequest(seed=0, max_new_tokens=6, num_inference_steps=2)


@pytest.fixture()
def chat(tiny_pipe, tmp_path):
    """A chat on the session's tiny model, its output captured."""
    return TerminalChat(tiny_pipe, tmp_path / "out", defaults=FAST, stdout=io.StringIO(), stderr=io.StringIO())


def _errors(chat: TerminalChat) -> list[str]:
    return [line for line in chat.stderr.getvalue().splitlines() if line.startswith("error: ")]


def test_turns_continue_one_conversation_with_attached_media(chat, media_files):
    chat.loop(["hello", "", f"/image {media_files['image']}", f"/audio {media_files['audio']}", "what is this?"])
    turns = chat.conversation.turns
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    assert [t.text for t in turns if t.role == "user"] == ["hello", "what is this?"]
    assert turns[0].media == [] and sorted(ref.modality.value for ref in turns[2].media) == ["audio", "image"]
    assert all(not items for items in chat.attached.values())  # sent once
    assert chat.stdout.getvalue().count("anygpt> ") == 2 and _errors(chat) == []
    chat.handle("/reset")
    assert chat.conversation.turns == [] and "(new conversation)" in chat.stdout.getvalue()


def test_forced_media_are_written_and_their_paths_printed(chat):
    chat.loop(["/modalities image,audio", "draw and play", "again"])
    out = chat.stdout.getvalue()
    paths = re.findall(r"^  (image|audio): (.+)$", out, flags=re.M)
    assert [kind for kind, _ in paths] == ["image", "audio", "image", "audio"]
    assert [p.rsplit("/", 1)[1] for _, p in paths] == [
        "chat-0001_image0.png", "chat-0001_audio0.wav", "chat-0002_image0.png", "chat-0002_audio0.wav",
    ]  # fmt: skip
    assert load_image(paths[0][1]).size == (64, 64) and load_audio(paths[1][1]).waveform.size > 0
    assert "(rendering image: 1 of 2...)" in chat.stderr.getvalue()
    # a new chat on the same folder continues the numbering: nothing is overwritten
    again = TerminalChat(chat.pipe, chat.out, defaults=FAST, stdout=io.StringIO(), stderr=io.StringIO())
    again.loop(["/modalities image", "draw"])
    assert again.stdout.getvalue().strip().endswith("chat-0003_image0.png")
    # text only, then auto
    chat.loop(["/modalities none", "talk"])
    assert chat.modalities == [] and not re.search(r"^  image: .*chat-0004", chat.stdout.getvalue(), flags=re.M)
    chat.handle("/auto")
    assert chat.modalities == "auto"


def test_bad_lines_print_one_error_and_the_chat_goes_on(chat, media_files, tmp_path):
    chat.loop(
        [
            "/image",
            f"/image {tmp_path / 'missing.png'}",
            f"/image {media_files['audio']}",
            "/modalities smell",
            "/frobnicate",
            f"/video {media_files['video']}",
            "hello",
        ]
    )
    assert _errors(chat) == [
        "error: /image: expected a file path, as in /image PATH",
        f"error: /image {tmp_path / 'missing.png'}: expected a readable file, found nothing",
        f"error: /image {media_files['audio']}: the name says audio; attach it with /audio",
        "error: /modalities smell: unknown or unavailable output modality 'smell'; this model has decoders for "
        "image, video, audio; expected 'auto' or a list of them (or none: text only)",
        "error: unknown command /frobnicate: /help lists the commands",
    ]
    turns = chat.conversation.turns
    assert len(turns) == 2 and [ref.modality.value for ref in turns[0].media] == ["video"]  # it went on
    assert chat.modalities == "auto"


def test_a_failed_message_drops_its_attachments_and_keeps_the_conversation(chat, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    chat.loop(["hello", f"/image {broken}", "what is this?", "and now?"])
    (error,) = _errors(chat)
    assert "broken.png" in error and error.endswith("(the 1 attached file(s) were dropped: attach again)")
    assert [t.text for t in chat.conversation.turns if t.role == "user"] == ["hello", "and now?"]


def test_help_and_quit(chat):
    assert chat.handle("/help") is True
    for command in ("/image PATH", "/audio PATH", "/video PATH", "/modalities", "/auto", "/reset", "/help", "/quit"):
        assert command in chat.stdout.getvalue()
    assert str(chat.out) in chat.stdout.getvalue()
    assert chat.loop(["/quit", "never answered"]) == 0
    assert chat.conversation.turns == []


def test_the_command_reads_stdin_until_eof(monkeypatch, capsys, tiny_pipe, tmp_path, media_files):
    """``anygpt chat`` through the dispatcher, stdin a pipe: its options reach every request, EOF ends it (exit 0)."""
    seen = []
    monkeypatch.setattr(terminal_chat, "load_pipeline", lambda model, runtime=None: seen.append(model) or tiny_pipe)
    script = f"/image {media_files['image']}\ndescribe\n/modalities image\ndraw\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    out = tmp_path / "chat"
    assert cli.main(["chat", "--model", "tiny", "--out", str(out), "--max-new-tokens", "5", "--steps", "2"]) == 0
    captured = capsys.readouterr()
    assert seen == ["tiny"]
    assert captured.out.count("anygpt> ") == 2 and f"  image: {out / 'chat-0001_image0.png'}" in captured.out
    assert "error" not in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["chat-0001_image0.png"]


def test_bad_options_fail_before_the_model_loads(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(terminal_chat, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("")
    assert cli.main(["chat", "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == f"anygpt: error: --out {tmp_path / 'file'}: expected a folder, found a file\n"
    assert cli.main(["chat", "--max-new-tokens", "0"]) == 2
    assert "max_new_tokens" in capsys.readouterr().err


def test_toyworld_answers_in_the_terminal(tmp_path):
    """The real command in a subprocess on the default model: it draws, then describes its own picture."""
    out = tmp_path / "out"
    script = f"draw a red circle\n/image {out / 'chat-0001_image0.png'}\nwhat colour is it?\n/quit\n"
    done = subprocess.run(
        [sys.executable, "-m", "anygpt", "chat", "--out", str(out)],
        input=script,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    replies = [line for line in done.stdout.splitlines() if line.startswith("anygpt> ")]
    assert len(replies) == 2 and "red circle" in replies[0] and "red" in replies[1].lower(), done.stdout
    assert f"  image: {out / 'chat-0001_image0.png'}" in done.stdout
    assert load_image(out / "chat-0001_image0.png").size == (64, 64)
    assert "error" not in done.stderr
