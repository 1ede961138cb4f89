"""N models in one vmapped step (ensemble.py): each is the same run as its single run."""

import dataclasses
import json

import pytest
import torch

from tests.support import Silent, assert_user_error, fit_run, needs_cpp_compiler, random_mnist, run, train_args
from tinymnist.algorithm import networks, optim
from tinymnist.algorithm.config import model_configs, recipe_config
from tinymnist.algorithm.train import (
    epoch_batches,
    evaluate,
    initial_state,
    make_gradient,
    make_step,
    per_model,
    restore_rng,
)
from tinymnist.errors import TinyMnistError
from tinymnist.tool import checkpoint
from tinymnist.transforms import wide_conv
from tinymnist.transforms.speed import compiled, device_step
from tinymnist.transforms.vmap import evaluate_many, on_model_axis, one_model, vmapped, vmapped_update

CPU = torch.device("cpu")
N = 3


def stack(trees):
    return per_model(trees, stacked=True)


def stacked_start(config, optimizer, seeds):
    singles = [networks.init_params(config.model, s) for s in seeds]
    return stack(singles), stack([optimizer.init(p) for p in singles])


def vmapped_step(gradient, optimizer):
    """The N-model step as device_step builds it: the gradient and the update each vmapped."""
    return make_step(vmapped(gradient), optim.Optimizer(optimizer.init, vmapped_update(optimizer.update)))


@pytest.mark.parametrize("model", ["mlp", "lenet"])
@pytest.mark.parametrize("optimizer_name", list(optim.OPTIMIZERS))
def test_one_vmapped_step_equals_n_separate_steps(model, optimizer_name):
    """Checked in the step's two halves, each against the single model's: the vmapped gradient
    against `gradient` alone, then the vmapped step's new params and state against the single
    update of that same gradient. (Compared whole, Adam's and RMSprop's division by sqrt(v) + eps
    turns the float rounding of a near-zero gradient into up to a whole step: 3e-5 was seen.)"""
    config = recipe_config(model, optimizer=optimizer_name, batch_size=32)
    optimizer = optim.OPTIMIZERS[optimizer_name]()
    gradient = make_gradient(config)
    data = random_mnist(200, 1)
    params, opt_state = stacked_start(config, optimizer, range(N))
    batch_idx = torch.randint(0, 200, (N, 32), generator=torch.Generator().manual_seed(0))  # (N, B)
    lrs = torch.tensor([1e-3, 2e-3, 5e-4])  # (N,)
    for _ in range(2):  # the second step sees non-zero optimizer state
        grads, _ = torch.func.vmap(gradient, in_dims=(0, None, None, 0))(
            params, data.train_images, data.train_labels, batch_idx
        )
        expected = []
        for i in range(N):
            own_grads, own_loss = gradient(one_model(params, i), data.train_images, data.train_labels, batch_idx[i])
            torch.testing.assert_close(one_model(grads, i), own_grads, rtol=1e-5, atol=1e-6)
            expected.append(
                (
                    *optimizer.update(one_model(grads, i), one_model(opt_state, i), one_model(params, i), lrs[i]),
                    own_loss,
                )
            )
        params, opt_state, losses = vmapped_step(gradient, optimizer)(
            params, opt_state, data.train_images, data.train_labels, batch_idx, lrs
        )
        for i, (p, s, loss) in enumerate(expected):
            torch.testing.assert_close(one_model(params, i), p, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(one_model(opt_state, i), s, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(losses[i], loss)


def test_each_model_starts_and_shuffles_as_its_single_run():
    config = recipe_config("mlp", seed=7, seeds=2, lrs=[1e-3, 3e-3])
    optimizer = optim.OPTIMIZERS["adam"]()
    state = initial_state(config, optimizer, CPU)
    shuffles = restore_rng(state.rng, CPU)
    assert [(m.lr, m.seed) for m in model_configs(config)] == [(1e-3, 7), (1e-3, 8), (3e-3, 7), (3e-3, 8)]
    for i, member in enumerate(model_configs(config)):
        single = initial_state(member, optimizer, CPU)
        torch.testing.assert_close(one_model(state.params, i), single.params, rtol=0, atol=0)
        own = torch.Generator().manual_seed(member.seed)
        for _ in range(2):  # two epochs' orders
            assert torch.equal(epoch_batches(500, 64, shuffles[i], CPU), epoch_batches(500, 64, own, CPU))


def test_dropout_masks_differ_between_models():
    """cnn: N copies of the same model on the same batch get different gradients only through dropout."""
    config = recipe_config("cnn", batch_size=8)
    gradient = make_gradient(config)
    params = stack([networks.init_params("cnn", 0)] * N)  # identical models
    data = random_mnist(8, 1)
    batch_idx = torch.arange(8).expand(N, 8)  # (N, B), the same batch for all
    grads, losses = torch.func.vmap(gradient, in_dims=(0, None, None, 0), randomness="different")(
        params, data.train_images, data.train_labels, batch_idx
    )
    assert len(set(losses.tolist())) == N
    assert not torch.equal(grads["fc1.weight"][0], grads["fc1.weight"][1])


def test_evaluate_many_matches_evaluate_and_averages_probabilities():
    config = recipe_config("mlp", test_batch_size=64)  # 150 test images: chunks of 64, 64, 22
    data = random_mnist(1, 150)
    singles = [networks.init_params("mlp", s) for s in range(N)]
    result = evaluate_many(config, stack(singles), data.test_images, data.test_labels)
    for params, got in zip(singles, result.models, strict=True):
        want = evaluate(config, params, data.test_images, data.test_labels)
        assert got.correct == want.correct and abs(got.loss - want.loss) < 1e-5
    from tinymnist.algorithm.train import scale_images

    x = scale_images(data.test_images, config.recipe.mean, config.recipe.std)
    probs = torch.stack([networks.apply("mlp", p, x).softmax(dim=1) for p in singles]).mean(0)  # (150, 10)
    assert result.ensemble.correct == int((probs.argmax(1) == data.test_labels).sum())


def tiny_fit(config, data, state=None, on_epoch_end=None):
    optimizer = optim.OPTIMIZERS[config.optimizer]()
    state = state or initial_state(config, optimizer, CPU)
    return fit_run(config, data, state, device_step(config, optimizer, CPU), Silent(), on_epoch_end)


def test_resume_of_n_models_is_bit_exact(tmp_path):
    """cnn (dropout, Adadelta, StepLR): 2 epochs straight equal 1 epoch, a checkpoint, 1 more.
    On fixed threads, as promised: an adaptive step that met a busy core sums in another order."""
    data = random_mnist(96, 40)
    fixed = {"batch_size": 32, "compile": False, "threads": torch.get_num_threads()}
    config = recipe_config("cnn", seeds=2, lrs=[1.0, 0.5], epochs=2, **fixed)
    straight = tiny_fit(config, data).state
    path = tmp_path / "n.pt"
    tiny_fit(
        recipe_config("cnn", seeds=2, lrs=[1.0, 0.5], epochs=1, **fixed),
        data,
        on_epoch_end=lambda state: checkpoint.save(path, config.to_dict(), state),
    )
    saved_config, saved = checkpoint.load(path, CPU)
    assert saved_config["seeds"] == 2 and saved_config["lrs"] == [1.0, 0.5] and saved.rng["shuffle"].shape[0] == 4
    resumed = tiny_fit(config, data, state=saved).state
    torch.testing.assert_close(resumed.params, straight.params, rtol=0, atol=0)
    torch.testing.assert_close(resumed.opt_state, straight.opt_state, rtol=0, atol=0)
    assert torch.equal(resumed.rng["shuffle"], straight.rng["shuffle"])


def test_a_checkpoint_with_the_wrong_number_of_models_is_refused(tmp_path):
    config = recipe_config("mlp", seeds=3)
    state = initial_state(config, optim.OPTIMIZERS["adam"](), CPU)
    path = tmp_path / "n.pt"
    checkpoint.save(path, {**config.to_dict(), "seeds": 2}, state)
    with pytest.raises(TinyMnistError, match="params do not match"):
        checkpoint.load(path, CPU)


@needs_cpp_compiler
def test_the_vmapped_step_compiles_once_and_not_again_for_new_rates():
    config = recipe_config("mlp", batch_size=16)
    optimizer = optim.OPTIMIZERS["adam"]()
    step = compiled(vmapped_step(make_gradient(config), optimizer))
    data = random_mnist(64, 1)
    params, opt_state = stacked_start(config, optimizer, range(4))
    batch_idx = torch.randint(0, 64, (4, 16))
    params, opt_state, _ = step(
        params, opt_state, data.train_images, data.train_labels, batch_idx, torch.full((4,), 1e-3)
    )
    with torch._dynamo.config.patch(error_on_recompile=True):
        for scale in (0.5, 0.25):  # a schedule's new rates, new batches: no second graph
            params, opt_state, losses = step(
                params,
                opt_state,
                data.train_images,
                data.train_labels,
                batch_idx.roll(1, 1),
                torch.tensor([1e-3, 2e-3, 3e-3, 4e-3]) * scale,
            )
    assert losses.shape == (4,) and torch.isfinite(losses).all()


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--seeds", "0"], "--seeds"),
        (["--lr", "1,,2"], "empty item"),
        (["--lr", "1,-2"], "-2 is not a positive"),
        (["--lr", "1,x"], "'x', not a number"),
        (["--lr", "1,1"], "twice"),
        (["--lr", "0.3,0.30000000000000004"], "twice (0.3, 0.3)"),  # one TensorBoard folder, one log name
    ],
)
def test_bad_seeds_and_lr_lists_are_one_line_errors(tiny_split, flags, fragment):
    assert_user_error(run(*train_args(tiny_split, "--model", "mlp", *flags)), fragment)


def test_an_n_model_run_matches_each_single_run(tiny_split, tmp_path):
    """Each model's final accuracy is its single run's (within 0.3 points); --metrics and eval say the same."""
    common = ("--model", "mlp", "--epochs", 2, "--batch-size", 50, "--seed", 3)
    metrics = tmp_path / "m.jsonl"
    result = run(
        *train_args(tiny_split, *common, "--seeds", 2, "--metrics", metrics, "--save-model", tmp_path / "n.pt")
    )
    assert result.exit_code == 0, result.output
    assert "Final test accuracy over 2 models" in result.output and "ensemble" in result.output
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(records) == 3 * 3  # epochs 0, 1, 2: two models and the ensemble each
    final = {r["seed"]: r["test_accuracy"] for r in records[-3:-1]}
    assert records[-1]["ensemble"] is True and records[-1]["models"] == 2
    for seed in (3, 4):
        single = run(
            *train_args(tiny_split, *[a if a != 3 else seed for a in common], "--metrics", tmp_path / f"s{seed}.jsonl")
        )
        assert single.exit_code == 0, single.output
        last = json.loads((tmp_path / f"s{seed}.jsonl").read_text().splitlines()[-1])
        assert abs(last["test_accuracy"] - final[seed]) <= 0.003
    evaluated = run("eval", tmp_path / "n.pt", "--data-dir", tiny_split, "--no-download", "--device", "cpu", "--json")
    lines = [json.loads(line) for line in evaluated.output.splitlines()]
    assert [line.get("seed") for line in lines] == [3, 4, None] and lines[-1]["ensemble"] is True
    assert [line["correct"] for line in lines] == [r["correct"] for r in records[-3:]]


def test_single_run_output_is_unchanged_by_the_ensemble_path(tiny_split, tmp_path):
    """--seeds 1 and one --lr: a single run, the same numbers as without the flags."""
    args = ("--model", "mlp", "--epochs", 1, "--batch-size", 100)
    plain = run(*train_args(tiny_split, *args))
    flagged = run(*train_args(tiny_split, *args, "--seeds", 1, "--lr", "0.001"))
    assert plain.exit_code == flagged.exit_code == 0
    strip = lambda out: [line for line in out.splitlines() if not line.startswith("Final")]  # noqa: E731 (timings)
    assert strip(plain.output) == strip(flagged.output)
    assert "Final test accuracy: " in flagged.output


def test_micro_batches_under_vmap_give_the_whole_batch_step(monkeypatch):
    """N models' (N, B) batch split into chunks along B: the same step as the whole batch at once (SGD: linear)."""
    monkeypatch.setitem(wide_conv.CHOSEN, ("cpu", "lenet"), wide_conv.VMAP_GRADIENT)  # vmapped, as on CUDA
    config = recipe_config("lenet", "sgd", batch_size=48, lr=0.1, seeds=N, compile=False)
    optimizer = optim.OPTIMIZERS["sgd"]()
    data = random_mnist(200, 1)
    params, opt_state = stacked_start(config, optimizer, range(N))
    batch_idx = torch.randint(0, 200, (N, 48), generator=torch.Generator().manual_seed(1))  # (N, B)
    args = (data.train_images, data.train_labels, batch_idx, torch.full((N,), 0.1))
    whole = vmapped_step(make_gradient(config), optimizer)(params, opt_state, *args)
    chunked = device_step(dataclasses.replace(config, micro_batch=16), optimizer, CPU)(params, opt_state, *args)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked[2], whole[2])
    assert chunked[2].shape == (N,)


def n_model_records(**overrides):
    data = random_mnist(120, 60, seed=5)
    config = recipe_config("mlp", seeds=N, batch_size=8, epochs=2, eval_every=4, compile=False, **overrides)
    optimizer = optim.OPTIMIZERS[config.optimizer]()
    result = fit_run(config, data, initial_state(config, optimizer, CPU), device_step(config, optimizer, CPU))
    return result


def test_n_models_evaluate_every_few_steps():
    records = n_model_records().records
    evaluations = [r["epoch"] for r in records if r.get("ensemble")]
    assert evaluations == [0, 0.2667, 0.5333, 0.8, 1, 1.2667, 1.5333, 1.8, 2]  # 15 steps an epoch
    assert len(records) == len(evaluations) * (N + 1)


def test_n_models_stop_when_every_model_has_reached_the_target():
    """The oracle: the same run without a target. Each model's first record at or above the target
    is where the target run marks it reached, and the run stops at the last of those."""
    oracle = [r for r in n_model_records().records if not r.get("ensemble")]
    per_model = [[r for r in oracle if r["seed"] == seed] for seed in range(1, N + 1)]
    target = min(max(r["test_accuracy"] for r in rows) for rows in per_model)  # every model gets there
    first = [next(r["epoch"] for r in rows if r["test_accuracy"] >= target) for rows in per_model]
    result = n_model_records(target_accuracy=target)
    marked = {r["seed"]: r["epoch"] for r in result.records if r.get("reached_target")}
    assert marked == dict(zip(range(1, N + 1), first, strict=True))
    assert [r["epoch"] for r in result.reached] == first
    assert result.records[-1]["epoch"] == max(first)
    assert all("images_total" in r for r in result.records if not r.get("ensemble"))


def test_one_model_on_the_model_axis_keeps_its_steps_untimed_seconds():
    """train.Clock reads untimed_seconds() (AdaptiveThreads' mid-run compiles) through the N = 1 wrapper."""

    def step(params, opt_state, images, labels, batch_idx, lr):
        return params, opt_state, torch.tensor(0.0)

    assert not hasattr(on_model_axis(step), "untimed_seconds")
    step.untimed_seconds = lambda: 2.5
    assert on_model_axis(step).untimed_seconds() == 2.5
