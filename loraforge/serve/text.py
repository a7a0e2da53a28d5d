"""Generated token ids as text: the final answer, and the pieces a stream can send without taking any back."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"  # what a decoder writes for the first bytes of a character not yet complete


class TextStream:
    """The text of one growing answer. `update` returns the new piece that is safe to send now; `finish` the
    rest. The pieces always add up to `text`, the final answer.

    The answer is decoded as `loraforge chat` decodes it (special tokens skipped; `strip` also strips the
    ends), then cut at the first stop string. Held back until more tokens arrive: an incomplete UTF-8
    character, trailing whitespace when stripping, and an ending that could be the start of a stop string.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = (), strip: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.strip = strip
        self.sent = ""
        self.text = ""
        self.stopped = False

    def update(self, token_ids: Sequence[int]) -> str:
        """The piece to send after `token_ids` (all tokens generated so far); sets `stopped` at a stop string."""
        text = self._decode(token_ids)
        if self.stopped:
            return self._send(self._final(text))
        return self._send(text[: self._safe_length(text)])

    def finish(self, token_ids: Sequence[int]) -> str:
        """The last piece; afterwards `text` holds the whole answer."""
        return self._send(self._final(self._decode(token_ids)))

    def _decode(self, token_ids: Sequence[int]) -> str:
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        if self.strip:
            text = text.lstrip()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            text = text[:cut]
        return text

    def _final(self, text: str) -> str:
        self.text = text.rstrip() if self.strip else text
        return self.text

    def _safe_length(self, text: str) -> int:
        # the longest ending of the text that some stop string starts with might still become that stop string
        held = max((size for stop in self.stop for size in range(1, min(len(stop), len(text) + 1))
                    if text.endswith(stop[:size])), default=0)
        safe = text[: len(text) - held].rstrip(REPLACEMENT_CHAR)
        return len(safe.rstrip() if self.strip else safe)

    def _send(self, visible: str) -> str:
        # Byte-level BPE decodes a longer id list to a longer string with the same beginning; a decoder that
        # rewrites earlier text (rare) sends nothing until its text extends what was sent again.
        if not visible.startswith(self.sent):
            return ""
        piece, self.sent = visible[len(self.sent) :], visible
        return piece
