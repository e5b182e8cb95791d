"""A task's answer streamed as it is generated: the worker's sender, the origin's record.

The worker decodes the text so far every few tens of milliseconds (the executor's
``on_text``) and sends what is new in a ``Progress`` record, one at a time: what grows
while a record is on its way goes in the next, so a fast model costs a record per round
trip, not one per token. It keeps back the last characters a stop string could still cut
and a character whose bytes are not all decoded yet, so what it sent is always a prefix
of the final answer.

The origin keeps the text of the attempt that streams (``StreamedText``). What clients
were shown (``shown``) only grows: a retry on another worker starts from nothing again
and is shown only past what clients already have, and only if it agrees with it (greedy
decoding and a fixed seed replay the same tokens). A retry that disagrees restarts what
is shown (``restarts`` counts it): clients are told the stream restarted and get the new
text from its start.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from vcoind.market.messages import MAX_DELTA_CHARS, Progress
from vcoind.p2p.streams import StreamProtocolError

RETRY_S = 0.2  # a delta that was not delivered is sent again (with what grew) after this


def sendable(text: str, stop: Sequence[str] = ()) -> str:
    """What of the text decoded so far may be shown: less as many of the last characters
    as the longest of the ``stop`` strings (one could still cut there) and a character
    still being decoded."""
    end = len(text) - max((len(s) for s in stop), default=0)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return text[: max(end, 0)]


class TextDeltas:
    """The worker side of one streamed attempt (``run`` in a nursery, ``update`` from the
    executor's ``on_text``)."""

    def __init__(
        self,
        task_id: str,
        attempt: int,
        send: Callable[[Progress], Awaitable[None]],
        stop: Sequence[str] = (),
    ) -> None:
        self._task_id, self._attempt, self._send = task_id, attempt, send
        self._stop = tuple(stop)  # the request's stop strings: what they may cut is kept back
        self._text = ""  # what may be sent
        self._sent = 0
        self._wake = trio.Event()

    def update(self, text: str) -> None:
        text = sendable(text, self._stop)
        if len(text) > len(self._text):
            self._text = text
            self._wake.set()

    async def run(self) -> None:
        """Send what is new until cancelled (the result follows with the whole text)."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._sent < len(self._text):
                chunk = self._text[self._sent : self._sent + MAX_DELTA_CHARS]
                try:
                    # (tokens: 0, the counts go in their own records)
                    await self._send(Progress(self._task_id, self._attempt, 0,
                                              offset=self._sent, text=chunk))  # fmt: skip
                except StreamProtocolError:
                    await trio.sleep(RETRY_S)
                    continue
                self._sent += len(chunk)


@dataclass
class StreamedText:
    """The origin side: the streaming attempt's text and what clients were shown."""

    shown: str = ""
    restarts: int = 0
    attempt: int = 0
    _text: str = ""

    def add(self, attempt: int, offset: int, text: str) -> bool:
        """A delta of ``attempt``; whether ``shown`` grew. Deltas of an older attempt, out
        of order or repeated are ignored."""
        if attempt < self.attempt:
            return False
        if attempt > self.attempt:
            self.attempt, self._text = attempt, ""
        if offset != len(self._text):
            return False
        self._text += text
        return self._show(self._text)

    def update(self, text: str) -> bool:
        """The whole text so far of an attempt the origin runs itself (a pipeline);
        whether ``shown`` grew."""
        return self._show(text)

    def finish(self, text: str) -> bool:
        """The final answer (the result's text, or the agreed one); whether ``shown`` grew."""
        return self._show(text, final=True)

    def _show(self, text: str, final: bool = False) -> bool:
        if text == self.shown or (len(text) <= len(self.shown) and not final):
            return False
        if not text.startswith(self.shown):
            self.restarts += 1
        self.shown = text
        return True
