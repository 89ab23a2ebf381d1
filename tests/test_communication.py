"""A model-parallel step moves O(batch d) per step, never the dictionary.

Each architecture's train step is compiled on the 8 fake CPU devices with the dictionary split
over the mesh's `model` axis, at a shape where one parameter shard (d x n_latents / model) is
far bigger than the batch's activations (batch x d), and the collectives of the optimized HLO
are read (`saejax.memory.collectives`). Every collective must be at most a small multiple of
batch x d elements (plus the top-k candidates, k per token from each shard), which at these
shapes is at most 1/8 of one parameter shard. The one exception is data parallelism's own: the
sum of the gradients over the `data` axis, an all-reduce whose arrays have the shapes of the
parameter shards. A failure lists every collective with the source line that made it.
"""

import math

import jax
import pytest

from conftest import toy_config
from saejax import memory, sae, sharding

D, EXPANSION_FACTOR, BATCH, K, K_AUX = 64, 256, 32, 8, 16
N_LATENTS = D * EXPANSION_FACTOR
# LLVM's optimisation level changes the machine code, not the optimized HLO or its collectives;
# at 0 the CPU compile is about twice as fast.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


CASES = [
    *[pytest.param(a, data, model, id=f"{a}-data{data}-model{model}")
      for a in sorted(sae.ARCHITECTURES) if a != "switch"
      for data, model in ((1, 8), (2, 4))],
    # Data parallelism alone: only the gradients' all-reduce is parameter-sized.
    pytest.param("relu", 8, 1, id="relu-data8-model1"),
    # The top-k of a batch split over `data` alone is taken per device (sharding._top_k):
    # XLA's partitioner would gather the whole [batch, n_latents] pre-activations.
    pytest.param("topk", 8, 1, id="topk-data8-model1"),
    pytest.param("batchtopk", 8, 1, id="batchtopk-data8-model1"),
    # Switch's experts split over the model axis (8 experts, one per device).
    pytest.param("switch", 1, 8, id="switch-data1-model8"),
    # Matryoshka prefixes over BatchTopK: a prefix masks the later latents (no slice of the
    # split latent axis), so its decode moves what the whole dictionary's does.
    pytest.param("batchtopk", 2, 4, id="matryoshka_batchtopk-data2-model4"),
]
# Overrides of a case beyond its architecture, by id.
OVERRIDES = {"matryoshka_batchtopk-data2-model4": {"sae.matryoshka_widths": (0.0625, 0.25)}}


def _bound(architecture: str, data: int, model: int) -> int:
    """The most elements one collective may hold: a few [batch, d] partial sums per device,
    plus the candidates a sharded top-k gathers."""
    rows = BATCH // data
    bound = 4 * rows * D
    if architecture in ("topk", "batchtopk", "switch"):
        bound += rows * K_AUX * model          # AuxK: k_aux per token from each shard
    if architecture in ("topk", "switch"):
        bound += rows * K * model              # k per token from each shard
    if architecture == "batchtopk":
        bound += K * BATCH * data * model      # k x batch from each device
    return bound


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(sorted(s for s in shape if s != 1))


def _too_big(found, trainer, bound: int) -> list:
    """The collectives above `bound` elements, but for the gradients' all-reduce over `data`."""
    # The gradients' shapes on one device (the sparse decode's encoder gradient is transposed).
    gradient_shapes = {_squeezed(leaf.sharding.shard_shape(leaf.shape))
                       for leaf in jax.tree.leaves(trainer.abstract_state["params"])}

    def allowed(c: memory.Collective) -> bool:
        if c.op.startswith("all-reduce") and c.mesh_axes == ("data",):
            return all(_squeezed(shape) in gradient_shapes or math.prod(shape) <= bound
                       for _, shape in c.arrays)
        return c.elements <= bound

    return [c for c in found if c.mesh_axes and not allowed(c)]


@pytest.mark.parametrize("architecture, data, model", CASES)
def test_collectives_move_activations_not_the_dictionary(architecture, data, model, request):
    config = toy_config(**{"sae.architecture": architecture, "data.d": D,
                           "sae.expansion_factor": EXPANSION_FACTOR, "train.batch_size": BATCH,
                           "sae.k": K, "sae.k_aux": K_AUX, "sae.switch_experts": 8,
                           "mesh.data": data, "mesh.model": model,
                           **OVERRIDES.get(request.node.callspec.id, {})})
    mesh = sharding.make_mesh(config.mesh)
    trainer, compiled = memory.compile_train_step(config, mesh, d=D,
                                                  compiler_options=FAST_COMPILE)
    found = memory.collectives(compiled.as_text(), mesh)

    bound = _bound(architecture, data, model)
    shard = D * N_LATENTS // model
    assert bound <= shard // 8, "the test shape must make one parameter shard dominate"
    too_big = _too_big(found, trainer, bound)
    listing = "\n".join(f"  {'TOO BIG ' if c in too_big else ''}{c}" for c in found)
    assert not too_big, (f"{len(too_big)} collective(s) above {bound} elements (one parameter "
                         f"shard: {shard}) on data={data} x model={model}:\n{listing}")
    if model > 1:  # the split dictionary does communicate: the partial sums of x_hat
        assert any("model" in c.mesh_axes for c in found), listing


SHAPES = {
    "transcoder": ({"data.source": "synthetic_transcoder", "sae.shape": "transcoder",
                    "sae.input_hook": "activations_in", "sae.target_hook": "activations_out"},
                   2),
    "crosscoder": ({"data.source": "synthetic_crosscoder", "data.n_layers": 3,
                    "sae.shape": "crosscoder", "sae.hooks": "layer_0,layer_1,layer_2"}, 3),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_other_shapes_move_activations_not_the_dictionary(shape):
    """A transcoder and a crosscoder split over `model` communicate their hooks' activations
    (a few [batch, d] per hook), never a dictionary shard."""
    overrides, n_hooks = SHAPES[shape]
    config = toy_config(**{"sae.architecture": "relu", "data.d": D,
                           "sae.expansion_factor": EXPANSION_FACTOR, "train.batch_size": BATCH,
                           "mesh.data": 2, "mesh.model": 4, **overrides})
    mesh = sharding.make_mesh(config.mesh)
    trainer, compiled = memory.compile_train_step(config, mesh, d=D,
                                                  compiler_options=FAST_COMPILE)
    found = memory.collectives(compiled.as_text(), mesh)
    bound = 4 * (BATCH // 2) * D * n_hooks
    shard = D * N_LATENTS // 4
    assert bound <= shard // 8
    too_big = _too_big(found, trainer, bound)
    assert not too_big, "\n".join(map(str, found))
    assert any("model" in c.mesh_axes for c in found)


def test_a_clt_split_over_layers_and_latents_moves_activations_not_the_dictionary():
    """A TopK CLT of 4 layers on data 2 x layer 2 x model 2: its collectives are partial sums
    of the targets (a few [batch, L d]) and the top-k candidates, never a decoder shard."""
    layers, expansion = 4, 64
    config = toy_config(**{"sae.architecture": "topk", "data.d": D, "train.batch_size": BATCH,
                           "sae.expansion_factor": expansion, "sae.k": K, "sae.k_aux": K_AUX,
                           "data.source": "synthetic_clt", "data.n_layers": layers,
                           "sae.shape": "clt", "sae.layers": f"0-{layers - 1}",
                           "mesh.data": 2, "mesh.layer": 2, "mesh.model": 2,
                           "sharding_rules": (("batch", "data"), ("layer", "layer"),
                                              ("latent", "model"), ("embed", None),
                                              ("group", None))})
    mesh = sharding.make_mesh(config.mesh)
    assert dict(mesh.shape) == {"data": 2, "layer": 2, "model": 2}
    trainer, compiled = memory.compile_train_step(config, mesh, d=D,
                                                  compiler_options=FAST_COMPILE)
    found = memory.collectives(compiled.as_text(), mesh)
    rows = BATCH // 2
    bound = 4 * rows * D * layers + rows * layers * (K + K_AUX) * 2
    shard = layers * layers * D * expansion * D // 4      # W_dec over layer x model
    assert bound <= shard // 8
    too_big = _too_big(found, trainer, bound)
    listing = "\n".join(f"  {'TOO BIG ' if c in too_big else ''}{c}" for c in found)
    assert not too_big, listing
    assert any("layer" in c.mesh_axes for c in found), listing


def test_collectives_parser_reads_async_forms_and_device_groups():
    """GPU programs use the async forms; device groups come in several notations."""
    hlo = "\n".join([
        '  %ags = (f32[4,64]{1,0}, f32[32,64]{1,0}) all-gather-start(f32[4,64]{1,0} %p), '
        'channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true, '
        'metadata={op_name="jit(train_step)/all_gather"}',
        '  %agd = f32[32,64]{1,0} all-gather-done((f32[4,64]{1,0}, f32[32,64]{1,0}) %ags)',
        '  %ars = (f32[8,64]{1,0}, f32[64]{0}) all-reduce-start(f32[8,64]{1,0} %a, f32[64]{0} %b)'
        ', channel_id=2, replica_groups=[4,2]<=[2,4]T(1,0), use_global_device_ids=true, '
        'to_apply=%add',
        '  %cps = (f32[16]{0}, f32[16]{0}, u32[], u32[]) collective-permute-start(f32[16]{0} %c),'
        ' channel_id=3, source_target_pairs={{0,4},{4,0}}',
        '  %ar = s32[18]{0} all-reduce(s32[18]{0} %d), channel_id=4, '
        "replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'}, "
        'use_global_device_ids=true, to_apply=%add',
        '  %rs = f32[2,64]{1,0} reduce-scatter(f32[8,64]{1,0} %e), channel_id=5, '
        'replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add',
        '  %fusion = f32[] fusion(%ar), kind=kLoop, calls=%fused',
    ])
    mesh = jax.sharding.AbstractMesh((2, 4), sharding.MESH_AXES)
    found = {c.name: c for c in memory.collectives(hlo, mesh)}
    assert sorted(found) == ["ags", "ar", "ars", "cps", "rs"]
    assert found["ags"].shapes == ("f32[32,64]",) and found["ags"].bytes == 32 * 64 * 4
    assert found["ags"].mesh_axes == ("model",)          # rows of [[0..3], [4..7]]
    assert found["ags"].op_name == "jit(train_step)/all_gather"
    assert found["ars"].elements == 8 * 64 + 64
    assert found["ars"].mesh_axes == ("data",)           # pairs {0,4}, {1,5}, ...
    assert found["cps"].shapes == ("f32[16]",) and found["cps"].mesh_axes == ("data",)
    assert found["ar"].mesh_axes == ("model",)           # [0,1,2,3] and [4,5,6,7]
    assert found["rs"].mesh_axes == ("model",)
