"""Property tests of the pure MAE ops against the reference's conventions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mae_jax import ops

SETTINGS = settings(max_examples=25, deadline=None)


def reference_patchify_nchw(imgs_nchw: np.ndarray, p: int) -> np.ndarray:
    """The official patchify, written on NCHW as the release does (nchpwq -> nhwpqc)."""
    n, c, hh, ww = imgs_nchw.shape
    h, w = hh // p, ww // p
    x = imgs_nchw.reshape(n, c, h, p, w, p)
    x = np.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


@SETTINGS
@given(
    n=st.integers(1, 3),
    gh=st.integers(1, 4),
    gw=st.integers(1, 4),
    p=st.sampled_from([1, 2, 4]),
    c=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_patchify_roundtrip_and_official_order(n, gh, gw, p, c, seed):
    x = np.random.default_rng(seed).normal(size=(n, gh * p, gw * p, c)).astype(np.float32)
    # jitted: new shapes in each example, one compile each instead of one per eager op
    patches = _jit_patchify(jnp.asarray(x), p)
    assert patches.shape == (n, gh * gw, p * p * c)
    np.testing.assert_array_equal(
        np.asarray(patches), reference_patchify_nchw(x.transpose(0, 3, 1, 2), p)
    )
    back = _jit_unpatchify(patches, p, (gh, gw), c)
    np.testing.assert_array_equal(np.asarray(back), x)


_jit_patchify = jax.jit(ops.patchify, static_argnums=1)
_jit_unpatchify = jax.jit(ops.unpatchify, static_argnums=(1, 2, 3))


def test_patchify_first_patch_is_top_left_block():
    x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    patches = ops.patchify(x, 4)
    np.testing.assert_array_equal(patches[1, 0], x[1, :4, :4, :].reshape(-1))
    np.testing.assert_array_equal(patches[1, 1], x[1, :4, 4:8, :].reshape(-1))  # next column
    np.testing.assert_array_equal(patches[1, 2], x[1, 4:8, :4, :].reshape(-1))  # next row


@pytest.mark.parametrize("shape,p", [((1, 30, 32, 3), 4), ((1, 32, 32, 3), 0), ((32, 32, 3), 4)])
def test_patchify_rejects_bad_shapes(shape, p):
    with pytest.raises(ValueError):
        ops.patchify(jnp.zeros(shape), p)


def reference_masking(noise: np.ndarray, ratio: float):
    n, length = noise.shape
    keep = int(length * (1 - ratio))
    ids_shuffle = np.argsort(noise, axis=1, kind="stable")
    ids_restore = np.argsort(ids_shuffle, axis=1, kind="stable")
    mask = np.ones((n, length), np.float32)
    mask[:, :keep] = 0
    mask = np.take_along_axis(mask, ids_restore, axis=1)
    return ids_shuffle[:, :keep], mask, ids_restore


@SETTINGS
@given(
    n=st.integers(1, 6),
    length=st.integers(1, 64),
    ratio=st.sampled_from([0.0, 0.1, 0.5, 0.75, 0.9, 0.99]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_masking_matches_reference(n, length, ratio, seed):
    noise = np.random.default_rng(seed).random((n, length)).astype(np.float32)
    # Jitted: each example has new shapes, and one compile of the whole function costs a third
    # of the eager op-by-op compiles (the eager path: the other tests of random_masking).
    out = _jit_random_masking(n, length, ratio, noise=jnp.asarray(noise))
    ids_keep, mask, ids_restore = (np.asarray(x) for x in out)
    r_keep, r_mask, r_restore = reference_masking(noise, ratio)
    np.testing.assert_array_equal(ids_keep, r_keep)
    np.testing.assert_array_equal(mask, r_mask)
    np.testing.assert_array_equal(ids_restore, r_restore)
    keep = int(length * (1 - ratio))
    # every sample keeps exactly int(L * (1 - ratio)) patches, and those are the kept ids
    np.testing.assert_array_equal(mask.sum(1), length - keep)
    for i in range(n):
        assert set(ids_keep[i].tolist()) == set(np.flatnonzero(mask[i] == 0))
    # ids_restore inverts the shuffle
    ids_shuffle = np.argsort(noise, axis=1, kind="stable")
    np.testing.assert_array_equal(
        np.take_along_axis(ids_shuffle, ids_restore, 1),
        np.tile(np.arange(length), (n, 1)),
    )


_jit_random_masking = jax.jit(ops.random_masking, static_argnums=(0, 1, 2))


def test_masks_differ_between_samples_and_keys():
    _, mask, _ = ops.random_masking(16, 196, 0.75, key=jax.random.key(0))
    rows = {tuple(np.asarray(m).tolist()) for m in mask}
    assert len(rows) == 16
    _, mask2, _ = ops.random_masking(16, 196, 0.75, key=jax.random.key(1))
    assert not np.array_equal(np.asarray(mask), np.asarray(mask2))


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "0.5"])
def test_random_masking_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        ops.random_masking(2, 16, ratio, key=jax.random.key(0))


def test_random_masking_rejects_bad_noise_and_key_combinations():
    with pytest.raises(ValueError, match=r"noise has shape \(2, 15\)"):
        ops.random_masking(2, 16, 0.5, noise=jnp.zeros((2, 15)))
    with pytest.raises(ValueError, match="exactly one"):
        ops.random_masking(2, 16, 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        ops.random_masking(2, 16, 0.5, key=jax.random.key(0), noise=jnp.zeros((2, 16)))


def test_unshuffle_restores_order_and_fills_mask_tokens():
    n, length, d = 3, 10, 4
    noise = jax.random.uniform(jax.random.key(3), (n, length))
    ids_keep, mask, ids_restore = ops.random_masking(n, length, 0.6, noise=noise)
    x = jax.random.normal(jax.random.key(4), (n, length, d))
    visible = ops.gather_tokens(x, ids_keep)
    token = jnp.full((1, 1, d), 7.0)
    full = ops.unshuffle(visible, token, ids_restore)
    m = np.asarray(mask).astype(bool)
    np.testing.assert_array_equal(np.asarray(full)[~m], np.asarray(x)[~m])
    np.testing.assert_array_equal(np.asarray(full)[m], 7.0)


def test_permute_tokens_gradient_is_the_gathers_and_scatter_free():
    x = jax.random.normal(jax.random.key(5), (3, 12, 4))
    order = jnp.argsort(jax.random.uniform(jax.random.key(6), (3, 12)), axis=1)
    cot = jax.random.normal(jax.random.key(7), (3, 12, 4))
    np.testing.assert_array_equal(ops.permute_tokens(x, order), ops.gather_tokens(x, order))
    want = jax.grad(lambda x: jnp.sum(ops.gather_tokens(x, order) * cot))(x)
    grad = lambda x: jnp.sum(ops.permute_tokens(x, order) * cot)  # noqa: E731
    np.testing.assert_array_equal(jax.grad(grad)(x), want)
    backward = str(jax.make_jaxpr(jax.grad(grad))(x))
    assert "scatter" not in backward and "gather" in backward


@pytest.mark.parametrize("dim,gh,gw", [(16, 4, 4), (64, 3, 5), (768, 14, 14)])
def test_sincos_2d_closed_form(dim, gh, gw):
    table = ops.sincos_2d(dim, (gh, gw), cls_token=True)
    assert table.shape == (1 + gh * gw, dim) and table.dtype == np.float32
    np.testing.assert_array_equal(table[0], 0.0)
    quarter = dim // 4
    k = np.arange(quarter)
    f = 1.0 / 10000 ** (k / quarter)
    for r in range(gh):
        for c in range(gw):
            row = table[1 + r * gw + c]
            expected = np.concatenate([np.sin(c * f), np.cos(c * f), np.sin(r * f), np.cos(r * f)])
            np.testing.assert_allclose(row, expected, rtol=0, atol=1e-7)
    assert ops.sincos_2d(dim, (gh, gw), cls_token=False).shape == (gh * gw, dim)


def test_sincos_rejects_bad_dim():
    with pytest.raises(ValueError, match="multiple of 4"):
        ops.sincos_2d(30, 4)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), norm=st.booleans())
def test_loss_ignores_visible_patches_and_matches_formula(seed, norm):
    rng = np.random.default_rng(seed)
    n, length, dim = 2, 16, 12
    pred = rng.normal(size=(n, length, dim)).astype(np.float32)
    target = rng.normal(size=(n, length, dim)).astype(np.float32)
    _, mask, _ = ops.random_masking(n, length, 0.75, noise=jnp.asarray(rng.random((n, length))))
    mask = np.asarray(mask)
    loss = float(ops.mae_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), norm))
    t = target
    if norm:  # unbiased variance, as torch.var's default in the reference
        t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
    expected = (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    changed = pred.copy()
    changed[mask == 0] += 100.0  # visible patches do not count
    loss2 = float(ops.mae_loss(jnp.asarray(changed), jnp.asarray(target), jnp.asarray(mask), norm))
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)


def test_norm_pix_uses_unbiased_variance():
    t = jnp.asarray([[[1.0, 2.0, 3.0, 4.0]]])
    out = np.asarray(ops.normalize_targets(t, eps=0.0))
    np.testing.assert_allclose(out.std(ddof=1), 1.0, rtol=1e-6)
    assert not np.isclose(out.std(ddof=0), 1.0)


def test_ops_work_under_jit_vmap_and_grad():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    f = jax.jit(lambda im: ops.patchify(im, 4))
    np.testing.assert_array_equal(f(x), ops.patchify(x, 4))
    masked = jax.jit(lambda k: ops.random_masking(2, 4, 0.5, key=k))(jax.random.key(0))
    assert masked[1].shape == (2, 4)
    per = jax.vmap(lambda im: ops.patchify(im[None], 4)[0])(x)
    np.testing.assert_array_equal(per, ops.patchify(x, 4))
    g = jax.grad(lambda p: ops.mae_loss(p, ops.patchify(x, 4), masked[1], True))(
        jnp.zeros((2, 4, 48))
    )
    assert g.shape == (2, 4, 48) and bool(jnp.all(jnp.isfinite(g)))
