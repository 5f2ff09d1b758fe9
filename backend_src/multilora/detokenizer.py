"""IncrementalDetokenizer: a request's output text, token by token, with stop strings."""

import logging
from typing import Optional

logger = logging.getLogger(__name__)

_INCOMPLETE = "\ufffd"  # what decode gives for a partial UTF-8 sequence


def _exact_backend(tokenizer):
    """The `tokenizers` object under a fast tokenizer whose decode it is, exactly; else None.

    With space clean-up off, transformers' `decode` of such a tokenizer is its backend's
    `decode`, reached through several Python layers that cost more than the decode itself,
    once per generated token. A subclass that overrides decoding keeps its own path.
    """
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls = type(tokenizer)
    if not isinstance(tokenizer, TokenizersBackend) or cls.decode is not PreTrainedTokenizerBase.decode \
            or cls._decode is not TokenizersBackend._decode:
        return None
    return tokenizer.backend_tokenizer


class IncrementalDetokenizer:
    """Output text of one request, kept exact while decoding only a short window per token.

    `text` always equals `tokenizer.decode(token_ids, skip_special_tokens=...,
    clean_up_tokenization_spaces=False)` cut before the first stop string.
    (Space clean-up is off because it rewrites text already streamed; transformers
    skips it for BPE tokenizers anyway.)

    Like vLLM, each `append` decodes `token_ids[prefix_offset:]` and keeps what
    follows the text of `token_ids[prefix_offset:read_offset]`: the prefix
    tokens give the new ones their context (a leading space, the first bytes of
    a character), so the window agrees with a full decode. The window moves on
    only once its text is final: it ends in a complete character and not in an
    open run of byte-fallback tokens. Streamed deltas hand out final text only.
    """

    def __init__(self, tokenizer, stop: list[str], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._backend = _exact_backend(tokenizer)
        self._skip_special_tokens = skip_special_tokens
        self._stop = list(stop)
        assert all(self._stop), "empty stop strings are refused by SamplingParams"
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""  # decode(token_ids[prefix_offset:read_offset])
        self._committed = ""  # text of token_ids[:read_offset]; final
        self._pending = ""  # text of token_ids[read_offset:]; later tokens may change it
        self._searched = 0  # text length already searched for stop strings
        self.stop_reason: Optional[str] = None
        self._stopped_text: Optional[str] = None
        self._emitted = 0  # length of text handed out by take_delta

    @property
    def text(self) -> str:
        if self._stopped_text is not None:
            return self._stopped_text
        return self._committed + self._pending

    def append(self, token_id: int, check_stop: bool = True) -> Optional[str]:
        """Add a generated token; return the stop string it completed, if any.

        After a stop string `text` ends just before it and the caller must
        finish the request: appending more is a bug. With `check_stop=False`
        (before min_tokens) the new text is never searched for stop strings.
        """
        assert self.stop_reason is None, "append() after a stop string finished the request"
        self.token_ids.append(token_id)
        self._decode_new_token()
        if not check_stop:
            self._searched = self._current_len()
            return None
        return self._find_stop() if self._stop else None

    def take_delta(self, finished: bool) -> str:
        """Text added since the previous call; all deltas concatenate to the final `text`.

        While not finished, a trailing incomplete character and any ending that
        could grow into a stop string are held back for a later call.
        """
        text = self.text
        if finished or self.stop_reason is not None:
            end = len(text)
        else:
            end = len(self._committed) - self._stop_prefix_len()
        delta = text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta

    # --- decoding ------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens)
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _decode_new_token(self) -> None:
        window = self._decode(self.token_ids[self._prefix_offset :])
        # From offset 0 the window is the whole output; further on, the prefix
        # must decode to some text to give the new tokens their context.
        anchored = self._prefix_offset == 0 or self._prefix_text
        if anchored and window.startswith(self._prefix_text):
            tail = window[len(self._prefix_text) :]
        else:
            # The prefix gave no anchoring text (only skipped special tokens, or a
            # lone space the tokenizer strips at the start): decode it all, rarely.
            tail = self._tail_from_full_decode()
        # A token that added no text (a skipped special token) ends nothing: a
        # byte-fallback run continues across it.
        added_nothing = tail == self._pending
        if added_nothing or tail.endswith(_INCOMPLETE) or self._is_fallback_byte(self.token_ids[-1]):
            self._pending = tail  # later tokens may still change this text
            return
        self._committed += tail
        self._pending = ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        self._prefix_text = self._decode(self.token_ids[self._prefix_offset : self._read_offset])

    def _is_fallback_byte(self, token_id: int) -> bool:
        """A SentencePiece byte-fallback token such as <0xE6>.

        Such tokens decode as one group per run, and a run that is not valid
        UTF-8 becomes U+FFFD for every byte, even bytes that decoded fine
        before: text from an open run is not final until another token ends it.
        """
        token = self._tokenizer.convert_ids_to_tokens(token_id)
        return isinstance(token, str) and len(token) == 6 and token.startswith("<0x") and token.endswith(">")

    def _tail_from_full_decode(self) -> str:
        full = self._decode(self.token_ids)
        if full.startswith(self._committed):
            return full[len(self._committed) :]
        # Only a tokenizer whose decode rewrites final text can get here; start over from 0.
        logger.warning("tokenizer decode changed text already produced; streamed deltas may not add up")
        self._committed, self._prefix_text, self._searched = "", "", 0
        self._prefix_offset = self._read_offset = 0
        return full

    # --- stop strings --------------------------------------------------------

    def _current_len(self) -> int:
        """Length of the text as it decodes now, less a trailing incomplete character."""
        return len(self._committed) + len(self._pending.rstrip(_INCOMPLETE))

    def _slice(self, start: int, end: int) -> str:
        """text[start:end] without building the whole text."""
        c = len(self._committed)
        if start >= c:
            return self._pending[start - c : end - c]
        return self._committed[start:end] + self._pending[: max(0, end - c)]

    def _find_stop(self) -> Optional[str]:
        """Cut the text before the earliest stop string in it, if any, and return that string."""
        # The current text, final or not, counts: a stop ends the request, and
        # with it the output ids, so this text is the final one.
        current_len = self._current_len()
        # Anything starting earlier lay wholly inside text already searched.
        start = max(0, self._searched - self._max_stop_len + 1)
        region = self._slice(start, current_len)
        self._searched = current_len
        found = [(i, s) for s in self._stop if (i := region.find(s)) != -1]
        if not found:
            return None
        index, stop = min(found, key=lambda f: f[0])  # min keeps list order on ties
        self._stopped_text = self._slice(0, start + index)
        self.stop_reason = stop
        return stop

    def _stop_prefix_len(self) -> int:
        """Length of the longest ending of the final text that begins some stop string."""
        final_len = len(self._committed)
        longest = min(self._max_stop_len - 1, final_len)
        tail = self._committed[final_len - longest :] if longest > 0 else ""
        for k in range(longest, 0, -1):
            if any(s.startswith(tail[-k:]) for s in self._stop):
                return k
        return 0
