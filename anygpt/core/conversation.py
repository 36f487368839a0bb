"""Chat templates and the multi-turn conversation state.

A ``Conversation`` keeps the turns and, for every media item it has seen, the frozen encoder's output, so a
media file is encoded once per conversation however many turns follow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from anygpt.base.modality import Modality


@dataclass(frozen=True)
class ChatTemplate:
    """How turns are laid out as text. ``{system} USER: ... ASSISTANT: ...</s>USER: ...`` for Vicuna v1.

    A user turn is ``{user} `` then, for each media item, ``{media_open}<item>{media_close}``, then ``{media_end}``
    (after the last item), then ``{text}{sep}``.
    """

    name: str
    system: str
    user: str
    assistant: str
    sep: str
    assistant_end: str  # text appended after every finished assistant turn
    end_with_eos: bool  # whether the tokenizer's EOS token also closes an assistant turn (Vicuna's "</s>")
    media_open: str = ""  # text before each media item of a user turn
    media_close: str = ""  # text after each media item
    media_end: str = "\n"  # text between a user turn's media and its text
    stop: tuple[str, ...] = ()  # text that ends an assistant turn besides EOS (generation should stop there)

    @property
    def end_of_turn(self) -> tuple[str, ...]:
        """Every text that ends an assistant turn besides EOS: the ``stop`` strings, then the template's own role
        markers (the user and assistant prefixes, stripped) that no stop string already covers, so a reply never
        shows the template: ``("USER:", "ASSISTANT:")`` for Vicuna v1, ``("###",)`` for NExT-GPT's v0 (whose
        ``### Human:`` / ``### Assistant:`` hold its stop string), none for ``plain``."""
        markers = list(self.stop)
        for prefix in (self.user, self.assistant):
            marker = prefix.strip()
            if marker and not any(s in marker for s in markers):
                markers.append(marker)
        return tuple(markers)


TEMPLATES: dict[str, ChatTemplate] = {
    "vicuna_v1": ChatTemplate(
        name="vicuna_v1",
        system=(
            "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
            "helpful, detailed, and polite answers to the user's questions."
        ),
        user="USER:",
        assistant="ASSISTANT:",
        sep=" ",
        assistant_end="",
        end_with_eos=True,
    ),
    # NExT-GPT's released model (legacy code, Vicuna v0): ``### Human: <Img>{media}</Img> {text}\n### Assistant:``,
    # every media item wrapped as in its training (``<Img>`` is plain text there; see anygpt.apps.convert); a reply
    # ends with ``###`` (its stop token, id 835).
    "nextgpt_v0": ChatTemplate(
        name="nextgpt_v0",
        system="",
        user="### Human:",
        assistant="### Assistant:",
        sep="\n",
        assistant_end="\n",
        end_with_eos=False,
        media_open="<Img>",
        media_close="</Img>",
        media_end=" ",
        stop=("###",),
    ),
    "plain": ChatTemplate(name="plain", system="", user="", assistant="", sep="", assistant_end="", end_with_eos=True),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}: expected one of {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


@dataclass(frozen=True)
class MediaRef:
    """One media item of a turn: its modality and a content key (hash) under which its features are cached."""

    modality: Modality
    key: str
    source: str | None = None  # the file it came from, when it came from a file


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    text: str
    media: list[MediaRef] = field(default_factory=list)
    token_ids: list[int] | None = None  # assistant turns: the ids the model produced (with signal groups)


# A prompt piece: text (tokenised with special tokens split, so user text can never inject a token), a media
# item (becomes K placeholder tokens), or token ids used as they are.
Piece = str | MediaRef | list[int]


@dataclass
class Conversation:
    """A multi-turn chat. Pass it to ``AnyGPTPipeline.__call__(..., conversation=conv)`` turn after turn.

    Attributes:
        turns: the user and assistant turns so far.
        features: encoder outputs by media key: each media item is encoded once per conversation.
        template: chat template name; None takes the model's own when the pipeline first uses the conversation.
    """

    template: str | None = None

    def __post_init__(self):
        if self.template is not None:
            get_template(self.template)  # fail early on an unknown name

    turns: list[Turn] = field(default_factory=list)
    features: dict[str, Any] = field(default_factory=dict)

    def add_user(self, text: str, media: list[MediaRef] | None = None) -> None:
        self.turns.append(Turn("user", text, list(media or [])))

    def add_assistant(self, text: str, token_ids: list[int]) -> None:
        self.turns.append(Turn("assistant", text, token_ids=list(token_ids)))

    def pop_last_exchange(self) -> tuple[Turn | None, Turn | None]:
        """Remove and return the last (user, assistant) turns, for "retry last turn"."""
        assistant = self.turns.pop() if self.turns and self.turns[-1].role == "assistant" else None
        user = self.turns.pop() if self.turns and self.turns[-1].role == "user" else None
        return user, assistant

    def clear(self) -> None:
        self.turns.clear()
        self.features.clear()

    def __repr__(self) -> str:
        """One line: the template, each turn's role and the start of its text, the media cached (not the tensors)."""

        def short(text: str) -> str:
            return repr(text if len(text) <= 40 else text[:37] + "...")

        turns = ", ".join(
            f"{turn.role}: {short(turn.text)}" + (f" +{len(turn.media)} media" if turn.media else "")
            for turn in self.turns
        )
        return f"Conversation(template={self.template!r}, turns=[{turns}], cached_media={len(self.features)})"

    def media(self) -> list[MediaRef]:
        return [m for t in self.turns for m in t.media]

    def prompt_pieces(self, eos_token_id: int | None) -> list[Piece]:
        """The whole conversation as prompt pieces, ending with the assistant prefix (ready for generation).

        Vicuna v1: ``{system} USER: {text} ASSISTANT:{reply ids}</s>USER: {text} ASSISTANT:``. A reply's ids follow
        the assistant prefix directly, as they were generated after it.
        """
        if self.template is None:
            raise ValueError("conversation has no chat template yet (set Conversation.template)")
        tpl = get_template(self.template)
        pieces: list[Piece] = []
        if tpl.system:
            pieces.append(tpl.system + tpl.sep)
        for turn in self.turns:
            if turn.role == "user":
                pieces.append(f"{tpl.user} " if tpl.user else "")
                for ref in turn.media:
                    pieces.extend([tpl.media_open, ref, tpl.media_close])
                if turn.media:
                    pieces.append(tpl.media_end)
                pieces.append(turn.text + tpl.sep)
            else:
                pieces.append(tpl.assistant)
                pieces.append(list(turn.token_ids or []))
                pieces.append(tpl.assistant_end)
                if tpl.end_with_eos and eos_token_id is not None:
                    pieces.append([eos_token_id])
        pieces.append(tpl.assistant)
        return [p for p in pieces if not (isinstance(p, str | list) and len(p) == 0)]
