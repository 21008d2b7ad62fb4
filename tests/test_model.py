"""The model: both layer forms compute one function, which is the plain JAX step's model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxscale.config import ModelSpec
from jaxscale.model import Transformer, next_token_loss
from jaxscale.step import _init_state, _stacked_params, layer_form, optimizer
from plain_step import plain_train_step

SPEC = ModelSpec(d_model=32, n_layers=3, n_heads=4, d_ff=64, seq_len=16, vocab=64)


def _tokens(seed=0, batch=2):
    return jax.random.randint(jax.random.key(seed), (batch, SPEC.seq_len + 1), 0, SPEC.vocab)


def _weights(seed=0, **model):
    """A model's float32 weights, built by one jitted initializer (eager construction compiles op by op)."""
    return jax.jit(lambda: nnx.to_pure_dict(nnx.split(Transformer(SPEC, rngs=nnx.Rngs(seed), **model))[1]))()


def _stacked(params):
    """Per-layer weights (the unrolled form) stacked as the scanned form holds them."""
    if "layers" in params:
        return params
    blocks = [params["blocks"][i] for i in range(SPEC.n_layers)]
    return {**{k: v for k, v in params.items() if k != "blocks"},
            "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def _graphdef(**model):
    return nnx.split(nnx.eval_shape(lambda: Transformer(SPEC, rngs=nnx.Rngs(0), **model)))[0]


def _loss_and_grads(scan_layers: bool, params, tokens):
    """Loss and gradients of one layer form, from stacked weights; the gradients come back stacked."""
    graphdef = _graphdef(scan_layers=scan_layers)
    loss, grads = jax.jit(jax.value_and_grad(
        lambda p: next_token_loss(nnx.merge(graphdef, layer_form(p, scan_layers)), tokens)))(params)
    return loss, grads


def test_unrolled_and_scanned_layers_are_the_same_function():
    tokens, params = _tokens(), _weights(scan_layers=True)
    (loss_u, grads_u), (loss_s, grads_s) = (_loss_and_grads(False, params, tokens),
                                            _loss_and_grads(True, params, tokens))
    np.testing.assert_allclose(loss_u, loss_s, rtol=1e-6)
    assert jax.tree.structure(grads_u) == jax.tree.structure(grads_s)
    for a, b in zip(jax.tree.leaves(grads_u), jax.tree.leaves(grads_s)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # every layer gets its own gradient: the slices are not tied together
    wqkv = grads_u["layers"]["wqkv"]
    assert wqkv.shape[0] == SPEC.n_layers and not np.allclose(wqkv[0], wqkv[1])


def _to_plain(params: dict) -> dict:
    """jaxscale's parameters (unrolled form) in the plain step's layout (same numbers)."""
    blocks = [params["blocks"][i] for i in range(SPEC.n_layers)]
    return {"embed": params["embed"], "head": params["head"], "ln_f": params["final_norm"]["scale"],
            "layers": [{"ln1": b["attn_norm"]["scale"], "ln2": b["mlp_norm"]["scale"], "wqkv": b["wqkv"],
                        "wo": b["wo"], "w1": b["w_in"], "w2": b["w_out"]} for b in blocks]}


def test_the_model_and_its_update_are_the_plain_steps():
    """Same weights, same loss and the same AdamW update as the independently written plain step."""
    params, opt_state = jax.jit(lambda: _init_state(SPEC, seed=0))()
    plain = plain_train_step(SPEC.d_model, SPEC.n_layers, SPEC.n_heads, SPEC.d_ff, SPEC.vocab, "float32")
    tokens = _tokens(2)
    graphdef = _graphdef()

    def ours(p):
        return next_token_loss(nnx.merge(graphdef, p), tokens)

    np.testing.assert_allclose(jax.jit(ours)(params), jax.jit(plain.loss)(_to_plain(params), tokens), rtol=1e-5)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(ours)(params)
        updates, _ = optimizer().update(grads, opt_state, params)
        return loss, optax.apply_updates(params, updates)

    loss, stepped = step(params, opt_state)
    plain_params = _to_plain(params)
    new_plain, _, plain_loss = plain.step(plain_params, plain.init(jax.random.key(0))[1], tokens)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(_to_plain(stepped)), jax.tree.leaves(new_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_initializer_does_not_grow_with_depth():
    """Stacked parameters come from one vmapped initializer: the same program at 2 and 24 layers,
    so building a deep model never compiles n_layers copies of the random draws."""
    def equations(layers):
        spec = ModelSpec(d_model=32, n_layers=layers, n_heads=4, d_ff=64, seq_len=16, vocab=64)
        return len(jax.make_jaxpr(lambda: _stacked_params(spec, 0))().jaxpr.eqns)

    assert equations(2) == equations(24)


def test_weights_do_not_depend_on_the_layer_form_or_dtype():
    """The unrolled form's per-layer weights are the slices of the scanned form's stacked ones: the same draws
    from the seed, bit for bit under XLA's default CPU emitters. The tests' legacy emitters (helpers) may fuse
    the normal draw's arithmetic differently in the two initializer programs and round its last bits apart
    (by up to 6e-8 here); other draws would differ by the weights' own size, about 0.1."""
    a, b = _weights(3, scan_layers=True, dtype="bfloat16"), _weights(3, scan_layers=False)
    assert "blocks" in b and len(b["blocks"]) == SPEC.n_layers
    assert jax.tree.structure(b) == jax.tree.structure(layer_form(a, False))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(_stacked(b))):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
