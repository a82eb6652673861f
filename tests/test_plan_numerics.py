"""The memory-saving paths of the planned AR train step against PyTorch references (float32):

* causal query-chunked attention (``qwen2.attention.causal_chunked_attention``) vs ``torch`` SDPA with a causal +
  padding mask, values and gradients;
* the token-chunked cross entropy (``nexus.loss.LazyLogits``) vs ``torch.nn.functional.cross_entropy`` on the full
  logits, loss and gradients with respect to the hidden states and the projection;
* the Qwen2 decoder with a sequence longer than ``QUERY_CHUNK`` (chunked path) vs the dense path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from configs.qwen2_5 import Qwen2TextConfig
from nexus_jax.models.qwen2 import attention as qattn
from nexus_jax.models.qwen2 import model as qmodel
from nexus_jax.models.qwen2.masks import causal_padding_mask
from nexus_jax.nexus import loss as L

IMG = 7


def _torch_attention(q, k, v, mask):
    """SDPA reference: q [B, L, Hq, D], k / v [B, L, Hkv, D] torch tensors (kv repeated to Hq heads), bool mask
    [B, 1, L, L]."""
    g = q.shape[2] // k.shape[2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(g, 1),
                                         v.transpose(1, 2).repeat_interleave(g, 1),
                                         attn_mask=torch.as_tensor(np.asarray(mask)))
    return out.transpose(1, 2)


@pytest.mark.parametrize("chunk", [16, 13])
def test_causal_chunked_attention_matches_torch(chunk):
    rng = np.random.default_rng(0)
    b, length, hq, hkv, d = 3, 40, 6, 2, 8  # 3 query heads per kv head, a last chunk shorter than the others
    shapes = [(b, length, hq, d), (b, length, hkv, d), (b, length, hkv, d)]
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    pad = np.ones((b, length), np.int32)
    pad[1, 30:] = 0  # right padding: every query row still sees a key
    mask = causal_padding_mask(jnp.asarray(pad), length, b)
    got = qattn.causal_chunked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, chunk)
    qt, kt, vt = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    want = _torch_attention(qt, kt, vt, mask)
    err = float(np.abs(np.asarray(got) - want.detach().numpy()).max())

    w = rng.standard_normal((b, length, hq, d)).astype(np.float32)
    grads = jax.grad(lambda *a: jnp.sum(qattn.causal_chunked_attention(*a, mask, chunk) * w), argnums=(0, 1, 2))(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    (want * torch.as_tensor(w)).sum().backward()
    gerr = max(float(np.abs(np.asarray(a) - t.grad.numpy()).max()) for a, t in zip(grads, (qt, kt, vt)))
    print(f"chunk {chunk}: max abs err {err:.2e}, gradients {gerr:.2e}")
    assert err < 1e-5 and gerr < 1e-5


def test_causal_chunked_attention_rejects_bad_input():
    x = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="as many keys as queries"):
        qattn.causal_chunked_attention(x, jnp.zeros((1, 6, 2, 4)), jnp.zeros((1, 6, 2, 4)), None, 4)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        qattn.causal_chunked_attention(x, x, x, None, 0)


def test_lazy_logits_cross_entropy_matches_torch():
    rng = np.random.default_rng(1)
    b, length, dim, vocab = 2, 37, 12, 19
    hidden = rng.standard_normal((b, length, dim)).astype(np.float32)
    kernel = rng.standard_normal((dim, vocab)).astype(np.float32)
    labels = rng.integers(0, vocab, (b, length))
    labels[0, :5] = L.IGNORE_INDEX
    labels[1, 10:14] = IMG

    def jax_loss(h, w, chunk):
        lazy = L.LazyLogits(h, lambda x: x @ w, vocab, chunk=chunk)
        return L.chunked_token_cross_entropy(lazy, jnp.asarray(labels), IMG)[0]

    ht, wt = torch.tensor(hidden, requires_grad=True), torch.tensor(kernel, requires_grad=True)
    tl = torch.as_tensor(labels).clone()
    tl[tl == IMG] = -100
    want = F.cross_entropy((ht @ wt)[:, :-1].reshape(-1, vocab), tl[:, 1:].reshape(-1))
    want.backward()
    dense = L.token_cross_entropy(jnp.asarray(hidden) @ jnp.asarray(kernel), jnp.asarray(labels), IMG)[0]
    for chunk in (8, 64):
        got, (gh, gw) = jax.value_and_grad(jax_loss, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(kernel), chunk)
        err = abs(float(got) - want.item())
        gerr = max(float(np.abs(np.asarray(gh) - ht.grad.numpy()).max()),
                   float(np.abs(np.asarray(gw) - wt.grad.numpy()).max()))
        print(f"chunk {chunk}: CE {float(got):.6f} vs torch {want.item():.6f}, max abs err {err:.2e}, grads {gerr:.2e}")
        assert err < 1e-5 and gerr < 1e-5
        assert abs(float(got) - float(dense)) < 1e-5


def test_lazy_logits_bad_input():
    with pytest.raises(ValueError, match=r"\[B, L, D\]"):
        L.LazyLogits(jnp.zeros((4, 3)), lambda x: x, 5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lazy = L.LazyLogits(jnp.zeros((1, 4, 3)), lambda x: jnp.zeros((*x.shape[:2], 5)), 5, chunk=2)
        L.chunked_token_cross_entropy(lazy, jnp.asarray([[1, 2, 9, 3]]), IMG)


def test_qwen2_long_sequence_chunked_matches_dense(monkeypatch):
    """A sequence longer than QUERY_CHUNK through the decoder (chunked attention) equals the dense path."""
    cfg = Qwen2TextConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_layers=1, num_heads=6,
                          num_kv_heads=2, head_dim=8, mrope_section=None, remat="full")
    model = qmodel.Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 24)))
    mask = jnp.ones((2, 24), jnp.int32).at[1, 20:].set(0)

    def loss(m):
        return jnp.sum(m(ids, attention_mask=mask).logits[:, :20] ** 2)

    monkeypatch.setattr(qmodel, "QUERY_CHUNK", 10_000)
    dense, dense_g = nnx.value_and_grad(loss)(model)
    monkeypatch.setattr(qmodel, "QUERY_CHUNK", 7)
    chunked, chunked_g = nnx.value_and_grad(loss)(model)
    gerr = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(dense_g), jax.tree.leaves(chunked_g)))
    rel = abs(float(dense) - float(chunked)) / abs(float(dense))
    print(f"decoder dense vs chunked: rel err {rel:.2e}, max abs grad err {gerr:.2e}")
    assert rel < 1e-6 and gerr < 1e-4
