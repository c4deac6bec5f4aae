"""The conversation loop behind `pmod chat`: a multi-turn conversation about one image, answered through
`pmod.pipelines.generation` (the prompt `pmod eval` and lmms-eval give the same question), with each answer's cost."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..data.conversation import PLACEHOLDERS, render
from ..data.images import load_image  # noqa: F401  (part of this module's API: pmod.pipelines.chat.load_image)
from ..errors import PModError, PModInputError
from .generation import Generation, generate_batch

logger = logging.getLogger(__name__)


@dataclass
class ChatSession:
    """A conversation about one image with a p-MoD model and its processor (multi-turn, history re-encoded)."""

    model: Any
    processor: Any
    image: Any
    max_new_tokens: int = 128
    temperature: float = 0.0
    messages: list[dict] = field(default_factory=list)

    def ask(self, prompt: str, write: Callable[[str], None] | None = None) -> tuple[str, Generation]:
        """Answer ``prompt`` (the answer's text streamed to ``write``); returns the answer and what it cost. A prompt
        that names a placeholder (``<image>``: pmod places the image itself) is refused; a refused or failed turn
        leaves the conversation as it was."""
        typed = [p for p in PLACEHOLDERS if p in prompt]
        if typed:
            raise PModInputError(
                f"the prompt contains {', '.join(typed)}: pmod places the image itself; ask without it"
            )
        content = [{"type": "text", "text": prompt}]
        if not self.messages:
            content.insert(0, {"type": "image"})
        turn = [*self.messages, {"role": "user", "content": content}]
        text = render(self.processor, turn, add_generation_prompt=True)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {}
        out = generate_batch(self.model, self.processor, [text], [[self.image]], max_new_tokens=self.max_new_tokens,
                             write=write, **sampling)
        answer = out.texts[0]
        self.messages = [*turn, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        return answer, out


def chat_loop(session: ChatSession, lines: Iterable[str], write: Callable[[str], None],
              prompt_marker: Callable[[], None], complain: Callable[[str], None] | None = None) -> int:
    """Answer each non-empty line until it ends or says exit/quit; returns the number of turns. A line that cannot be
    answered (bad input, or text that is not UTF-8 when ``lines`` decodes with ``surrogateescape``) is reported to
    ``complain`` and the conversation goes on."""
    complain = complain or (lambda message: logger.error("%s", message))
    turns = 0
    prompt_marker()
    for line in lines:
        line = line.strip()
        if line in ("exit", "quit"):
            break
        if line and any("\udc80" <= c <= "\udcff" for c in line):  # undecodable bytes, escaped by the reader
            complain("that line is not UTF-8 text; not asked")
        elif line:
            try:
                _, stats = session.ask(line, write)
            except PModError as exc:
                complain(str(exc))
            else:
                write(f"[{stats.summary()}]\n")
                turns += 1
        prompt_marker()
    return turns
