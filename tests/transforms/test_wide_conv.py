"""The N-model forward of transforms/wide_conv.py against torch.func.vmap of the plain networks.

The oracle is the path it replaces: vmap of networks.apply and of train.make_gradient's
gradient. Tolerances are float32 reassociation: a loop of plain convolutions, im2col and a
batched product, or vmap's grouped convolution add the same products in other orders, and
a sum of ~10^3 float32 products is only exact to about 1e-6 of its magnitude.
"""

import dataclasses

import pytest
import torch

from tests.support import needs_cpp_compiler, needs_cuda, random_mnist
from tinymnist.algorithm import networks, optim
from tinymnist.algorithm.config import recipe_config
from tinymnist.algorithm.train import make_gradient, make_step, per_model, scale_images
from tinymnist.algorithm.trees import tree_map
from tinymnist.transforms import speed
from tinymnist.transforms.speed import compiled, device_step, micro_batched
from tinymnist.transforms.vmap import n_models_gradient, n_models_update, one_model, vmapped, vmapped_update
from tinymnist.transforms.wide_conv import CHOSEN, CONV_RULES, ONE_BY_ONE, SIDE_BY_SIDE, wide_forward, wide_gradient

CPU = torch.device("cpu")
N, B = 3, 8
NO_DROPOUT = [m for m in networks.MODEL_NAMES if m != "cnn"]  # cnn's dropout is random: tested apart
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def stacked_params(model: str, n: int = N):
    return per_model([networks.init_params(model, seed) for seed in range(n)], stacked=True)


def batch(n: int = N, b: int = B, images: int = 64, seed: int = 0):
    """Random digits and each model's own batch of them, (N, B)."""
    data = random_mnist(images, 1, seed=seed)
    batch_idx = torch.randint(0, images, (n, b), generator=torch.Generator().manual_seed(seed))  # (N, B)
    return data.train_images, data.train_labels, batch_idx


@pytest.mark.parametrize("rule", list(CONV_RULES))
@pytest.mark.parametrize("model", networks.MODEL_NAMES)
def test_the_forward_pass_is_vmap_of_the_network(model, rule):
    """Every network, every rule, dropout off: each model's output is its own network's."""
    images, _, batch_idx = batch()
    x = scale_images(images[batch_idx].flatten(0, 1), 0.1307, 0.3081).unflatten(0, (N, B))  # (N, B, 1, 28, 28)
    params = stacked_params(model)
    expected = torch.func.vmap(networks.apply, in_dims=(None, 0, 0))(model, params, x)  # (N, B, 10)
    torch.testing.assert_close(wide_forward(model, params, x, CONV_RULES[rule]), expected, **TOLERANCE)


@pytest.mark.parametrize("rule", list(CONV_RULES))
@pytest.mark.parametrize("model", NO_DROPOUT)
def test_gradients_and_losses_are_vmap_of_the_gradient(model, rule):
    """The networks without dropout, at their recipes (label smoothing for fast): each model's
    gradient and mean loss are what vmap(make_gradient) gives it."""
    config = recipe_config(model)
    images, labels, batch_idx = batch()
    params = stacked_params(model)
    expected_grads, expected_losses = vmapped(make_gradient(config))(params, images, labels, batch_idx)
    grads, losses = wide_gradient(config, CONV_RULES[rule])(params, images, labels, batch_idx)
    assert grads.keys() == params.keys()  # the networks' own names: conv1.weight, ...
    torch.testing.assert_close(grads, expected_grads, **TOLERANCE)
    torch.testing.assert_close(losses, expected_losses, **TOLERANCE)


@pytest.mark.parametrize("rule", list(CONV_RULES))
def test_one_model_with_dropout_is_the_single_models_gradient(rule):
    """cnn, dropout on, N = 1: the same seed draws the same masks as the single model's
    gradient (dropout's masks have the same size in the same order), so the two agree."""
    config = recipe_config("cnn")
    images, labels, batch_idx = batch(n=1)
    params = stacked_params("cnn", 1)
    torch.manual_seed(3)
    expected_grads, expected_loss = make_gradient(config)(one_model(params, 0), images, labels, batch_idx[0])
    torch.manual_seed(3)
    grads, losses = wide_gradient(config, CONV_RULES[rule])(params, images, labels, batch_idx)
    torch.testing.assert_close(one_model(grads, 0), expected_grads, **TOLERANCE)
    torch.testing.assert_close(losses[0], expected_loss, **TOLERANCE)


def test_models_do_not_see_each_others_parameters_or_masks():
    """cnn, dropout on, N = 3: another model's parameters change nothing of model 0's
    gradient under the same seed, and models fed the same batch draw different masks."""
    config = recipe_config("cnn")
    images, labels, batch_idx = batch()
    gradient = wide_gradient(config)
    params = stacked_params("cnn")
    torch.manual_seed(0)
    grads, _ = gradient(params, images, labels, batch_idx)
    changed = {k: torch.cat([v[:1], v[1:] * 2]) for k, v in params.items()}  # models 1 and 2 differ
    torch.manual_seed(0)
    grads_changed, _ = gradient(changed, images, labels, batch_idx)
    torch.testing.assert_close(one_model(grads_changed, 0), one_model(grads, 0), rtol=0, atol=0)
    same = stacked_params("cnn", 1).copy()
    same = {k: v.expand(N, *v.shape[1:]) for k, v in same.items()}  # N copies of one model
    _, losses = gradient(same, images, labels, batch_idx[:1].expand(N, B))
    assert len(set(losses.tolist())) == N


def test_dropout_gradients_have_vmaps_mean():
    """cnn, dropout on, N = 2: the masks differ from vmap's, so single draws cannot be compared;
    over 200 draws, each model's mean loss and mean gradient of fc2.weight agree with
    vmap(make_gradient)'s within 5 standard errors of their difference, and the spread of its
    loss (what the masks do; dropout's 1/(1-p) keeps the mean) within 25% of vmap's: a standard
    deviation from 200 draws is good to about 5%, and dropout at 1.6 p doubled it."""
    config = recipe_config("cnn")
    images, labels, batch_idx = batch(n=2, b=4)
    params = stacked_params("cnn", 2)
    torch.manual_seed(0)
    draws = 200

    def samples(gradient):
        outs = [gradient(params, images, labels, batch_idx) for _ in range(draws)]
        losses = torch.stack([loss for _, loss in outs])  # (D, N)
        return losses, torch.stack([grads["fc2.weight"] for grads, _ in outs])  # (D, N, 10, 128)

    wide = samples(wide_gradient(config))
    plain = samples(vmapped(make_gradient(config)))
    for ours, theirs in zip(wide, plain, strict=True):
        error = ((ours.var(0) + theirs.var(0)) / draws).sqrt()  # of the difference of two means
        assert ((ours.mean(0) - theirs.mean(0)).abs() <= 5 * error + 1e-7).all()
    spread = wide[0].std(0) / plain[0].std(0)  # (N,), each model's loss
    assert ((0.8 < spread) & (spread < 1.25)).all(), spread


@pytest.mark.parametrize("model", ["lenet", "fast"])
def test_micro_batches_of_the_n_model_gradient_give_the_whole_batch(model):
    """device_step splits the (N, B) indices along B; each chunk's mean gradient weighted by
    its share sums to the whole batch's (the last chunk here is shorter)."""
    config = recipe_config(model, seeds=N)
    images, labels, batch_idx = batch(b=40)
    params = stacked_params(model)
    gradient = n_models_gradient(config, CPU)
    whole = gradient(params, images, labels, batch_idx)
    chunked = micro_batched(gradient, 16)(params, images, labels, batch_idx)
    torch.testing.assert_close(chunked, whole, **TOLERANCE)


@pytest.mark.parametrize("model", ["lenet", "fast"])  # eager on the CPU: one model at a time
def test_device_steps_n_model_step_is_the_vmapped_step(model):
    """The N-model step device_step builds (eager, micro-batched, by the route wide_conv.CHOSEN
    names for the CPU) equals the plain vmapped step."""
    config = recipe_config(model, "sgd", batch_size=32, lr=0.1, seeds=N, compile=False, micro_batch=16)
    optimizer = optim.OPTIMIZERS["sgd"]()
    images, labels, batch_idx = batch(b=32)
    params = stacked_params(model)
    opt_state = per_model([optimizer.init(one_model(params, i)) for i in range(N)], stacked=True)
    args = (images, labels, batch_idx, torch.full((N,), 0.1))
    plain = optim.Optimizer(optimizer.init, vmapped_update(optimizer.update))
    expected = make_step(vmapped(make_gradient(config)), plain)(params, opt_state, *args)
    got = device_step(config, optimizer, CPU)(params, opt_state, *args)
    torch.testing.assert_close(got, expected, **TOLERANCE)


@pytest.mark.parametrize("optimizer_name", ["adam", "adadelta"])
def test_one_model_is_not_mapped_and_gets_its_single_step(optimizer_name):
    """N = 1 (`bench --seeds 1`, `train --seeds 1` stacked): the single model's own gradient and
    update on its slices, with the model axis put back; the same numbers as vmap gives."""
    config = recipe_config("lenet", optimizer_name, seeds=1)
    optimizer = optim.OPTIMIZERS[optimizer_name]()
    images, labels, batch_idx = batch(n=1)
    params = stacked_params("lenet", 1)
    opt_state = per_model([optimizer.init(one_model(params, 0))], stacked=True)
    grads, losses = n_models_gradient(config, CPU)(params, images, labels, batch_idx)
    own_grads, own_loss = make_gradient(config)(one_model(params, 0), images, labels, batch_idx[0])
    torch.testing.assert_close(one_model(grads, 0), own_grads, rtol=0, atol=0)
    assert losses.shape == (1,) and losses[0] == own_loss
    lr = torch.full((1,), 1e-3)
    got = n_models_update(optimizer.update, 1)(grads, opt_state, params, lr)
    expected = vmapped_update(optimizer.update)(grads, opt_state, params, lr)
    torch.testing.assert_close(got, expected, **TOLERANCE)


@pytest.mark.parametrize(
    "model", sorted(m for (d, m), rule in CHOSEN.items() if d == "cpu" and rule in (ONE_BY_ONE, SIDE_BY_SIDE))
)
def test_one_model_of_a_network_run_apart_runs_its_single_step(model, monkeypatch):
    """N = 1 of a network whose models run apart on the CPU (cnn, fast, lenet): the step device_step
    builds is the single run's own (here eager), on the model's slices: the same numbers to the bit,
    and no N-model gradient is built."""
    monkeypatch.setattr(speed, "n_models_gradient", None)  # calling it (the in-graph N = 1 route) fails the test
    config = recipe_config(model, "adam", batch_size=32, compile=False, micro_batch=16, seeds=1)
    optimizer = optim.adam()
    images, labels, batch_idx = batch(n=1, b=32)
    params = stacked_params(model, 1)
    opt_state = per_model([optimizer.init(one_model(params, 0))], stacked=True)
    lr = torch.full((1,), 1e-3)
    torch.manual_seed(0)  # cnn's dropout
    got = speed.device_step(config, optimizer, CPU, stacked=True)(params, opt_state, images, labels, batch_idx, lr)
    single = speed.device_step(config, optimizer, CPU, stacked=False)
    torch.manual_seed(0)
    new_params, new_state, loss = single(
        one_model(params, 0), one_model(opt_state, 0), images, labels, batch_idx[0], lr[0]
    )
    assert got[2].shape == (1,) and torch.equal(got[2][0], loss)
    torch.testing.assert_close(one_model(got[0], 0), new_params, rtol=0, atol=0)
    torch.testing.assert_close(one_model(got[1], 0), new_state, rtol=0, atol=0)


@needs_cpp_compiler
def test_one_model_run_apart_takes_one_batch_a_call_whatever_steps_per_call_says(monkeypatch):
    """The loop gives a stacked step one batch a call, so the single step inside takes one too, even
    where --steps-per-call would make a single run's take several (built, not called: no compile)."""
    built = []
    monkeypatch.setattr(speed, "SeveralSteps", lambda *args: built.append(args) or args[0])
    config = recipe_config("fast", compile=True, micro_batch=0, steps_per_call=10, log_interval=10, seeds=1)
    speed.device_step(config, optim.adam(), CPU, stacked=True)
    assert built == []
    speed.device_step(config, optim.adam(), CPU, stacked=False)  # the control: a single run's takes 10
    assert len(built) == 1


def test_the_chosen_rules_are_rules():
    for (device_type, model), rule in CHOSEN.items():
        assert device_type in ("cpu", "cuda", "mps") and model in networks.MODEL_NAMES
        assert rule in CONV_RULES or rule in ("vmap-gradient", "one-by-one", "side-by-side")


@pytest.mark.parametrize(
    ("compile", "micro_batch"), [(False, 0), (False, 3), pytest.param(True, 0, marks=needs_cpp_compiler)]
)
def test_models_in_turn_are_n_single_steps(compile, micro_batch):
    """cnn on the CPU (wide_conv.CHOSEN: one model at a time): the N-model step device_step
    builds is each model's own single step, dropout masks included: the models draw from
    torch's generator in turn, as N single runs one after another would, and each gets
    the single step's gradient kernels (compiled: the same compiled code), in the same
    micro-batches (8 images in chunks of 3, 3 and 2)."""
    assert CHOSEN[("cpu", "cnn")] == "one-by-one"
    config = recipe_config("cnn", batch_size=8, seeds=N, compile=compile, micro_batch=micro_batch)
    single_config = dataclasses.replace(config, seeds=1)
    optimizer = optim.OPTIMIZERS[config.optimizer]()
    images, labels, batch_idx = batch()
    params = stacked_params("cnn")
    opt_state = per_model([optimizer.init(one_model(params, i)) for i in range(N)], stacked=True)
    lr = torch.full((N,), 0.5)
    torch.manual_seed(1)
    step = device_step(config, optimizer, CPU)
    new_params, new_state, losses = step(params, opt_state, images, labels, batch_idx, lr)
    torch.manual_seed(1)
    single = device_step(single_config, optimizer, CPU, adaptive_threads=False)
    for i in range(N):
        args = (one_model(params, i), one_model(opt_state, i), images, labels, batch_idx[i], lr[i])
        own_params, own_state, own_loss = single(*args)
        torch.testing.assert_close(one_model(new_params, i), own_params, **TOLERANCE)
        torch.testing.assert_close(one_model(new_state, i), own_state, **TOLERANCE)
        torch.testing.assert_close(losses[i], own_loss, **TOLERANCE)


@needs_cpp_compiler
@pytest.mark.parametrize("rule", list(CONV_RULES))
def test_the_n_model_step_compiles_as_one_graph_once(rule):
    """fullgraph: no graph break; new batches and rates reuse the graph (error_on_recompile)."""
    torch._dynamo.reset()  # the suite's earlier compiles count toward dynamo's recompile limit of this code
    config = dataclasses.replace(recipe_config("cnn", seeds=2), batch_size=8)
    optimizer = optim.OPTIMIZERS[config.optimizer]()
    step = compiled(
        make_step(wide_gradient(config, CONV_RULES[rule]), optimizer._replace(update=vmapped_update(optimizer.update)))
    )
    images, labels, batch_idx = batch(n=2)
    params = stacked_params("cnn", 2)
    opt_state = per_model([optimizer.init(one_model(params, i)) for i in range(2)], stacked=True)
    params, opt_state, _ = step(params, opt_state, images, labels, batch_idx, torch.full((2,), 1.0))
    with torch._dynamo.config.patch(error_on_recompile=True):
        params, opt_state, losses = step(
            params, opt_state, images, labels, batch_idx.roll(1, 1), torch.tensor([0.5, 0.25])
        )
    assert losses.shape == (2,) and torch.isfinite(losses).all()


@needs_cuda
@pytest.mark.parametrize("model", ["lenet", "fast"])
def test_the_n_model_step_on_cuda_is_the_vmapped_step(model):
    """The N-model step `train --seeds 3 --device cuda` runs (compiled, replayed as a CUDA
    graph, by wide_conv.CHOSEN's rule for CUDA) lands where the plain eager vmapped step
    lands after 3 steps. TF32 off: both sides in float32, so only reassociation differs."""
    with torch.backends.cudnn.flags(allow_tf32=False):  # conftest restores the matmul flag
        torch.backends.cuda.matmul.allow_tf32 = False
        n_model_steps_on_cuda_match(model)


def n_model_steps_on_cuda_match(model: str) -> None:
    cuda = torch.device("cuda")
    config = recipe_config(model, "sgd", batch_size=32, lr=0.1, seeds=N)
    optimizer = optim.OPTIMIZERS["sgd"]()
    data = random_mnist(96, 1, device=cuda)
    params = {k: v.to(cuda) for k, v in stacked_params(model).items()}
    opt_state = per_model([optimizer.init(one_model(params, i)) for i in range(N)], stacked=True)
    batches = torch.randint(0, 96, (3, N, 32), generator=torch.Generator().manual_seed(0)).to(cuda)  # (steps, N, B)
    lr = torch.full((N,), 0.1, device=cuda)
    plain = make_step(vmapped(make_gradient(config)), optim.Optimizer(optimizer.init, vmapped_update(optimizer.update)))
    finals = []
    for step in (plain, device_step(config, optimizer, cuda)):
        p, s = params, opt_state
        for batch_idx in batches:
            p, s, losses = step(p, s, data.train_images, data.train_labels, batch_idx, lr)
        # A CUDA graph's outputs are its own buffers, overwritten by its next replay: copies.
        finals.append((tree_map(torch.clone, p), tree_map(torch.clone, s), losses.clone()))
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-4, atol=1e-5)
    first = next(iter(params))
    assert not torch.equal(finals[1][0][first], params[first])  # the steps did train
