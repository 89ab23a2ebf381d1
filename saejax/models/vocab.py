"""Next-token cross-entropy and KL divergence computed over the vocabulary in chunks, from the
final normalised residual and the unembedding, without the full logits: Gemma 3's 262k-token
vocabulary makes [tokens, vocab] float32 logits 1 GiB per thousand tokens. Each chunk's logits
are made, soft-capped, folded into running log-sum-exp statistics and dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from saejax.models import layers

DEFAULT_CHUNK = 8192
_MASKED = -1e30  # a logit for a column outside the vocabulary; exp of it minus a max is 0


def _chunks(w_u: jax.Array, chunk: int):
    """(number of chunks, size, fn(i) -> (W_U[:, start:start+size], mask of columns new to
    chunk i)). The last chunk is shifted left to stay inside the vocabulary (no padded copy of
    W_U); its columns already seen are masked."""
    vocab = w_u.shape[1]
    size = min(int(chunk), vocab)
    n = -(-vocab // size)

    def get(i):
        start = jnp.minimum(i * size, vocab - size)
        columns = start + jnp.arange(size)
        return jax.lax.dynamic_slice_in_dim(w_u, start, size, axis=1), columns >= i * size

    return n, get


def _logits(h: jax.Array, w: jax.Array, softcap: float | None) -> jax.Array:
    out = jnp.einsum("...d,dv->...v", h, w.astype(h.dtype)).astype(jnp.float32)
    return layers.soft_cap(out, softcap)


def log_sum_exp(h: jax.Array, w_u: jax.Array, *, softcap: float | None = None,
                chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """log sum_v exp(logit_v) per position of `h` [..., d]: the softmax's normaliser."""
    n, get = _chunks(w_u, chunk)

    def body(i, carry):
        m, s = carry
        w, new = get(i)
        z = jnp.where(new, _logits(h, w, softcap), _MASKED)
        m_new = jnp.maximum(m, jnp.max(z, axis=-1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[..., None]), axis=-1)
        return m_new, s

    shape = h.shape[:-1]
    m, s = jax.lax.fori_loop(0, n, body, (jnp.full(shape, _MASKED, jnp.float32),
                                          jnp.zeros(shape, jnp.float32)))
    return m + jnp.log(s)


def next_token_losses(hidden: jax.Array, tokens: jax.Array, w_u: jax.Array, *,
                      softcap: float | None = None, chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """Cross-entropy (nats) of `tokens[:, 1:]` given the final residual `hidden[:, :-1]`
    [batch, seq, d] and W_U [d, vocab]: [batch, seq - 1], as log_softmax of the full logits."""
    h = hidden[:, :-1]
    target = jnp.take(w_u.T, tokens[:, 1:], axis=0)                    # [b, s-1, d]
    target_logit = layers.soft_cap(
        jnp.sum(h.astype(jnp.float32) * target.astype(jnp.float32), axis=-1), softcap)
    return log_sum_exp(h, w_u, softcap=softcap, chunk=chunk) - target_logit


def kl_divergences(hidden_p: jax.Array, hidden_q: jax.Array, w_u: jax.Array, *,
                   softcap: float | None = None, chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """KL(p || q) per position [batch, seq] of the next-token distributions of two final
    residuals, in one pass: KL = E_p[a - b] - lse(a) + lse(b) for logits a (p) and b (q)."""
    n, get = _chunks(w_u, chunk)

    def body(i, carry):
        m_a, s_a, t, m_b, s_b = carry
        w, new = get(i)
        a = jnp.where(new, _logits(hidden_p, w, softcap), _MASKED)
        b = jnp.where(new, _logits(hidden_q, w, softcap), _MASKED)
        m_a_new = jnp.maximum(m_a, jnp.max(a, axis=-1))
        e = jnp.exp(a - m_a_new[..., None])
        rescale = jnp.exp(m_a - m_a_new)
        s_a = s_a * rescale + jnp.sum(e, axis=-1)
        t = t * rescale + jnp.sum(e * (a - b), axis=-1)
        m_b_new = jnp.maximum(m_b, jnp.max(b, axis=-1))
        s_b = s_b * jnp.exp(m_b - m_b_new) + jnp.sum(jnp.exp(b - m_b_new[..., None]), axis=-1)
        return m_a_new, s_a, t, m_b_new, s_b

    shape = hidden_p.shape[:-1]
    low, zero = jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32)
    m_a, s_a, t, m_b, s_b = jax.lax.fori_loop(0, n, body, (low, zero, zero, low, zero))
    return t / s_a - (m_a + jnp.log(s_a)) + (m_b + jnp.log(s_b))
