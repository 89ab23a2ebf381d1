"""Token ids as the text a person reads: each token decoded on its own with the checkpoint's
tokenizer (cached), and the characters that would vanish on a page made visible."""

from __future__ import annotations

# Whitespace a page would collapse or render as nothing, shown as a visible mark instead.
_VISIBLE = str.maketrans({"\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"})


class TokenText:
    """Token ids to their text with a tokenizer (each token on its own), cached. Without a
    tokenizer a token reads as its id, `<123>`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in self._cache:
            if self.tokenizer is None:
                text = f"<{token_id}>"
            else:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False)
                piece = self.tokenizer.id_to_token(token_id) or ""
                if piece.startswith("\u2581") and not text.startswith(" "):
                    # A SentencePiece word start, whose space a Strip decoder (Llama 2's)
                    # removes from a lone token.
                    text = " " + text
                if not text:
                    text = piece or f"<{token_id}>"
            self._cache[token_id] = text
        return self._cache[token_id]


def visible(text: str) -> str:
    """`text` with newlines and tabs as visible marks (a page would show them as space)."""
    return text.translate(_VISIBLE)
