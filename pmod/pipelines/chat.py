"""The conversation loop behind `pmod chat`: a multi-turn conversation about one image, answered through
`pmod.pipelines.generation` (the prompt `pmod eval` and lmms-eval give the same question), with each answer's cost."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..data.conversation import render
from ..data.records import load_image  # noqa: F401  (part of this module's API: pmod.pipelines.chat.load_image)
from .generation import Generation, generate_batch


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
        """Answer ``prompt`` (the answer's text streamed to ``write``); returns the answer and what it cost."""
        content = [{"type": "text", "text": prompt}]
        if not self.messages:
            content.insert(0, {"type": "image"})
        self.messages.append({"role": "user", "content": content})
        text = render(self.processor, self.messages, add_generation_prompt=True)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {}
        out = generate_batch(self.model, self.processor, [text], [[self.image]], max_new_tokens=self.max_new_tokens,
                             write=write, **sampling)
        answer = out.texts[0]
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return answer, out


def chat_loop(session: ChatSession, lines: Iterable[str], write: Callable[[str], None], prompt_marker: Callable[[], None]) -> int:
    """Answer each non-empty line until it ends or says exit/quit; returns the number of turns."""
    turns = 0
    prompt_marker()
    for line in lines:
        line = line.strip()
        if line in ("exit", "quit"):
            break
        if line:
            _, stats = session.ask(line, write)
            write(f"[{stats.summary()}]\n")
            turns += 1
        prompt_marker()
    return turns
