"""Lockstep engine: same results as the per-model loop, grouping, and the runner's lockstep engine."""

from __future__ import annotations

from dataclasses import replace

from digitpairs.core.variants import variant_score
from digitpairs.data.pairs import make_draw, write_draws
from digitpairs.training import lockstep, lockstep_kernels
from digitpairs.training.lockstep import group_trials, run_lockstep
from digitpairs.training.lockstep_kernels import conv1_cols, im2col
from digitpairs.training.runner import run_trials
from digitpairs.training.semantics import TrainConfig
from digitpairs.training.train import run_trial
from digitpairs.training.trials import Trial, make_trial

import pytest
import torch
import torch.nn.functional as F

TINY = dict(nbch1=4, nbch2=8, nbfch=16)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and immune to other processes' load on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def draw1(mnist_splits):
    tensors, _ = make_draw(*mnist_splits, seed=1, draw=1)
    return tensors


@pytest.fixture(scope="module")
def draws(draw0, draw1):
    return {0: draw0, 1: draw1}


def mixed_job(arch: str, widths: dict, epochs: int = 1) -> list[Trial]:
    """Three trials of one shape with different lr, loss weights and draws (small lrs: with batch norm,
    larger ones make one epoch chaotic enough that float rounding alone changes weights by 1e-3)."""
    cfg = TrainConfig(epochs=epochs)
    if arch == "pair":
        return [
            make_trial("pair", widths, replace(cfg, lr=0.03), draw=0, seed=1),
            make_trial("pair", widths, replace(cfg, lr=0.01), draw=1, seed=1),
            make_trial("pair", widths, replace(cfg, lr=0.05), draw=0, seed=2),
        ]
    custom = make_trial("siamese-2", widths, replace(cfg, lr=0.05), draw=0, seed=1)
    return [
        make_trial("siamese-2", widths, replace(cfg, lr=0.03), draw=0, seed=1),
        make_trial("siamese-10", widths, replace(cfg, lr=0.01), draw=1, seed=1),
        replace(custom, train=replace(custom.train, w2=0.5, w10=0.3)),
    ]


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float, what: str) -> None:
    """Max abs difference relative to the tensor's largest entry."""
    a, b = a.double(), b.double()
    scale = a.abs().max().clamp_min(1e-12)
    assert ((a - b).abs().max() / scale) <= rel, f"{what}: relative difference {float((a - b).abs().max() / scale)}"


@pytest.mark.parametrize("arch", ["pair", "siamese"])
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("skip", [False, True])
def test_lockstep_matches_per_model_loop(draws, arch, bn, skip):
    job = mixed_job(arch, dict(TINY, batch_norm=bn, skip_connections=skip))
    outs = run_lockstep(job, draws, record_grad_norms=True)
    assert [o.trial for o in outs] == job
    for trial, out in zip(job, outs, strict=True):
        ref = run_trial(trial, draws[trial.draw], record_grad_norms=True)
        assert list(out.state) == list(ref.state)
        for key, value in ref.state.items():
            assert out.state[key].shape == value.shape and out.state[key].dtype == value.dtype, key
            if key.endswith("num_batches_tracked"):
                assert torch.equal(out.state[key], value)
            else:
                assert_close(value, out.state[key], 1e-4, key)
        assert out.result.grad_names == ref.result.grad_names
        assert out.result.grad_norms.shape == ref.result.grad_norms.shape
        # rounding differences grow over the epoch: 1.5e-4 at the last step of pair + BN + skip
        torch.testing.assert_close(out.result.grad_norms, ref.result.grad_norms, rtol=3e-4, atol=1e-6)
        assert out.result.epoch_loss == pytest.approx(ref.result.epoch_loss, rel=1e-5)
        for split in ("val", "test"):
            assert out.scores[split].keys() == ref.scores[split].keys()
            for metric, value in ref.scores[split].items():
                assert out.scores[split][metric] == pytest.approx(value, abs=2e-3), (split, metric)
        x = draws[trial.draw]["test_input"][:50]
        torch.testing.assert_close(out.model()(x), ref.model()(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("arch", ["pair", "siamese"])
def test_relu_logits_is_honoured(draws, arch):
    job = mixed_job(arch, dict(TINY, relu_logits=True))[:2]
    for trial, out in zip(job, run_lockstep(job, draws), strict=True):
        ref = run_trial(trial, draws[trial.draw])
        for key, value in ref.state.items():
            assert_close(value, out.state[key], 1e-4, key)
        for split in ("val", "test"):
            assert out.scores[split] == pytest.approx(ref.scores[split], abs=2e-3)


def test_accuracy_agrees_with_loop_on_several_draws(mnist_splits, draw0, draw1):
    """Lockstep learns as well as the loop: with lr 0.1 and batch norm, trajectories diverge after a
    few epochs (float rounding), so agreement is statistical rather than bitwise."""
    draws = {0: draw0, 1: draw1, 2: make_draw(*mnist_splits, seed=1, draw=2)[0]}
    widths = dict(nbch1=8, nbch2=8, nbfch=32)
    cfg = TrainConfig(lr=0.1, epochs=3)
    job = [make_trial(v, widths, cfg, draw=d, seed=1) for v in ("pair", "siamese-10") for d in draws]
    diffs = []
    for variant in ("pair", "siamese-10"):
        part = [t for t in job if t.variant == variant]
        lock = [variant_score(variant, o.scores["val"]) for o in run_lockstep(part, draws)]
        loop = [variant_score(variant, run_trial(t, draws[t.draw]).scores["val"]) for t in part]
        assert min(lock) > 0.7 and min(loop) > 0.7, (variant, lock, loop)
        diffs += [a - b for a, b in zip(lock, loop, strict=True)]
    diffs = torch.tensor(diffs)
    # per-draw accuracy noise over 1000 pairs is about 0.015; the mean difference must stay well inside
    assert diffs.abs().max() < 0.06 and abs(float(diffs.mean())) < 0.03, diffs


def test_group_trials_groups_by_shape_and_respects_batch():
    a, b = dict(TINY), dict(TINY, nbfch=32)
    cfg = TrainConfig(epochs=1)
    trials = [
        make_trial(v, w, replace(cfg, lr=lr), draw=d, seed=1)
        for d in range(3)
        for w in (a, b)
        for v in ("pair", "siamese-2", "siamese-10")
        for lr in (0.01, 0.1)
    ]
    trials.append(make_trial("pair", a, replace(cfg, epochs=2), draw=0, seed=1))
    trials.append(make_trial("pair", a, replace(cfg, shuffle=False), draw=0, seed=1))
    jobs = group_trials(trials, batch=5)
    assert sorted(t.key() for j in jobs for t in j) == sorted(t.key() for t in trials)
    assert all(1 <= len(j) <= 5 for j in jobs)
    for job in jobs:
        t0 = job[0]
        assert all(t.model == t0.model for t in job)
        assert all(
            (t.train.epochs, t.train.batch_size, t.train.shuffle) == (t0.train.epochs, 100, t0.train.shuffle)
            for t in job
        )
    # 4 shapes of 6 or 12 trials (siamese-2 and siamese-10 share a model) plus the 2 odd ones
    assert sorted(len(j) for j in jobs) == sorted([5, 1, 5, 5, 2, 5, 1, 5, 5, 2, 1, 1])
    assert group_trials(trials, batch=5) == jobs  # deterministic
    assert [len(j) for j in group_trials(trials, batch=1000)].count(12) == 2
    with pytest.raises(ValueError, match="batch"):
        group_trials(trials, batch=0)


def test_runner_lockstep_engine_matches_loop(tmp_path, mnist_splits):
    write_draws(mnist_splits, tmp_path, n_draws=2, seed=1)
    cfg = TrainConfig(lr=0.03, epochs=1)
    trials = [make_trial(v, TINY, cfg, draw=d, seed=1) for v in ("pair", "siamese-2", "siamese-10") for d in (0, 1)]
    lock = run_trials(trials, tmp_path, engine="lockstep", workers=1, batch=3, keep_state=True)
    loop = run_trials(trials, tmp_path, engine="loop", workers=1, keep_state=True)
    for a, b in zip(lock, loop, strict=True):
        assert a.trial == b.trial
        for split in ("val", "test"):
            assert a.scores[split] == pytest.approx(b.scores[split], abs=2e-3)
        assert_close(b.state["branch.fc2.weight"], a.state["branch.fc2.weight"], 1e-4, "fc2")


def test_cpu_split_of_a_big_job_changes_nothing(draws, monkeypatch):
    """On CPU a job is run in cache-sized chunks; the outcomes must not depend on the chunking."""
    from digitpairs.training import lockstep

    job = mixed_job("siamese", dict(TINY, batch_norm=True))
    whole = run_lockstep(job, draws, record_grad_norms=True)
    monkeypatch.setattr(lockstep, "CPU_ACTIVATION_BYTES", 1)  # one model per chunk
    parts = run_lockstep(job, draws, record_grad_norms=True)
    for a, b in zip(whole, parts, strict=True):
        assert a.trial == b.trial and a.scores == b.scores
        assert torch.equal(a.result.grad_norms, b.result.grad_norms) or torch.allclose(
            a.result.grad_norms, b.result.grad_norms, rtol=1e-5, atol=1e-7
        )
        for key, value in a.state.items():
            assert_close(value, b.state[key], 1e-5, key)


def test_im2col_rows_are_conv1_windows_grouped_by_pooling_member():
    """Row (q, p) of an image's im2col is the 3x3 window of conv1's output position
    (2 pi + di, 2 pj + dj), q = 2 di + dj, p = 6 pi + pj; columns (kh, kw, c)."""
    g = torch.Generator().manual_seed(0)
    for c in (1, 2):
        img = torch.randn(3, 14, 14, c, generator=g)
        w = torch.randn(5, c, 3, 3, generator=g)
        cols = im2col(img)
        assert cols.shape == (3, 4 * 36 * 9 * c)
        z = cols.view(3, 2, 2, 6, 6, 9 * c) @ w.permute(2, 3, 1, 0).reshape(9 * c, 5)
        ref = F.conv2d(img.permute(0, 3, 1, 2), w).view(3, 5, 6, 2, 6, 2).permute(0, 3, 5, 2, 4, 1)
        torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [8, 16])  # channels-first maps below 16 channels, channels-last above
@pytest.mark.parametrize("c", [1, 2])
def test_conv_pool_relu_matches_max_pool2d_with_ties(channels, c):
    """Forward and gradients equal conv2d -> max_pool2d -> +bias -> ReLU's, including ties: images of
    0s and 1s with 0/1 weights make many equal outputs from different windows, where only
    max_pool2d's choice (the first maximum) gives its weight gradient."""
    g = torch.Generator().manual_seed(1)
    k, b = 2, 5
    img = torch.randint(0, 2, (k * b, 14, 14, c), generator=g).float()
    weight = torch.randint(0, 2, (k, channels, c, 3, 3), generator=g).float()
    bias = torch.randn(k, channels, generator=g)
    upstream = torch.randn(k, b * 36, channels, generator=g)

    w = weight.permute(0, 3, 4, 2, 1).reshape(k, 9 * c, channels).requires_grad_()
    bs = bias.view(k, 1, channels).clone().requires_grad_()
    cols = conv1_cols(im2col(img), torch.arange(k * b).view(k, b))
    out = lockstep_kernels.ConvPoolReLU.apply(cols, w, bs)
    out.backward(upstream)
    with torch.no_grad():
        torch.testing.assert_close(lockstep_kernels.conv_pool_relu(cols, w, bs), out, rtol=0, atol=0)

    ref_w, ref_b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    x = img.view(k, b, 14, 14, c).permute(0, 1, 4, 2, 3)
    ref = torch.stack(
        [F.relu(F.max_pool2d(F.conv2d(x[i], ref_w[i]), 2) + ref_b[i].view(-1, 1, 1)) for i in range(k)]
    )  # [K, b, channels, 6, 6]
    ref = ref.permute(0, 1, 3, 4, 2).reshape(k, b * 36, channels)
    ref.backward(upstream)
    with torch.no_grad():  # ties happen: windows whose maximum two or more members reach
        y = F.conv2d(x[0], weight[0]).view(b, channels, 6, 2, 6, 2)
        assert ((y == y.amax((3, 5), keepdim=True)).sum((3, 5)) > 1).float().mean() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_w.grad.permute(0, 3, 4, 2, 1).reshape(k, 9 * c, channels))
    torch.testing.assert_close(bs.grad.view(k, channels), ref_b.grad)


def test_batch_norm_function_matches_functional():
    g = torch.Generator().manual_seed(2)
    k, r, n = 3, 50, 7
    h = (torch.randn(k, r, n, generator=g) * 2 + 1).requires_grad_()
    weight = torch.randn(k, 1, n, generator=g).requires_grad_()
    bias = torch.randn(k, 1, n, generator=g).requires_grad_()
    upstream = torch.randn(k, r, n, generator=g)
    out, mean, var = lockstep_kernels.BatchNorm.apply(h, weight, bias)
    out.backward(upstream)
    h2, w2, b2 = (t.detach().clone().requires_grad_() for t in (h, weight, bias))
    ref = torch.stack([F.batch_norm(h2[i], None, None, w2[i, 0], b2[i, 0], training=True) for i in range(k)])
    ref.backward(upstream)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, h.detach().mean(1, keepdim=True))
    torch.testing.assert_close(var, h.detach().var(1, keepdim=True, correction=0))
    for a, b in ((h, h2), (weight, w2), (bias, b2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["pair", "siamese"])
def test_lockstep_matches_loop_with_channels_last_maps(draws, arch):
    """16 conv1 channels or more take the channels-last path of conv1's maps (the other tests: 4)."""
    job = mixed_job(arch, dict(nbch1=16, nbch2=8, nbfch=16))[:2]
    for trial, out in zip(job, run_lockstep(job, draws, record_grad_norms=True), strict=True):
        ref = run_trial(trial, draws[trial.draw], record_grad_norms=True)
        for key, value in ref.state.items():
            if not key.endswith("num_batches_tracked"):
                assert_close(value, out.state[key], 1e-4, key)
        torch.testing.assert_close(out.result.grad_norms, ref.result.grad_norms, rtol=3e-4, atol=1e-6)
        for split in ("val", "test"):
            assert out.scores[split] == pytest.approx(ref.scores[split], abs=2e-3)


RECIPE = {
    "momentum": dict(momentum=0.9),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "weight decay": dict(weight_decay=5e-3),
    "cosine": dict(schedule="cosine"),
    "label smoothing": dict(label_smoothing=0.1),
    "shift": dict(shift=1),
    "elastic": dict(elastic=6.0, elastic_sigma=2.0),
    "cutout": dict(cutout=5),
    "dropout": dict(dropout=0.2),  # at 0.3 one trial's epoch is chaotic: a ReLU flip, 1e-3 apart (masks equal)
    "ema": dict(ema=0.9),
    "tta": dict(tta=1),
    "all": dict(
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-3,
        schedule="cosine",
        label_smoothing=0.1,
        shift=2,
        elastic=6.0,
        cutout=4,
        dropout=0.2,
        ema=0.8,
        tta=1,
    ),
}


@pytest.mark.parametrize("arch", ["pair", "siamese"])
@pytest.mark.parametrize("addition", list(RECIPE))
def test_recipe_additions_match_per_model_loop(draws, arch, addition):
    """siamese-plus's training and scoring (torch.optim.SGD's momentum and weight decay, the schedule,
    smoothing, shifts, elastic distortions, cutout, dropout, the moving average of the weights, the
    test-time shifts) are the same in both engines: small lrs (momentum multiplies the step by 10)."""
    job = [replace(t, train=replace(t.train, lr=t.train.lr / 5, **RECIPE[addition])) for t in mixed_job(arch, TINY)]
    assert len(group_trials(job, 64)) == 1  # lr and loss weights differ, the recipe does not: one job
    for trial, out in zip(job, run_lockstep(job, draws), strict=True):
        ref = run_trial(trial, draws[trial.draw])
        for key, value in ref.state.items():
            if not key.endswith("num_batches_tracked"):
                # 3e-4: a batch-norm bias starts at 0 and, at these lrs, ends near 6e-3, so the float32
                # rounding momentum accumulates over an epoch (about 1e-6) is 1e-4 of its largest entry
                assert_close(value, out.state[key], 3e-4, key)
        assert out.result.epoch_loss == pytest.approx(ref.result.epoch_loss, rel=1e-5)
        for split, scores in ref.scores.items():
            assert out.scores[split] == pytest.approx(scores, abs=2e-3), split


def test_recipe_changes_training_and_splits_jobs(draws):
    plain = mixed_job("siamese", TINY)[:1]
    shifted = [replace(plain[0], train=replace(plain[0].train, shift=1))]
    assert len(group_trials(plain + shifted, 64)) == 2
    a, b = run_lockstep(plain, draws)[0], run_lockstep(shifted, draws)[0]
    assert not torch.equal(a.state["branch.conv1.weight"], b.state["branch.conv1.weight"])


@pytest.mark.parametrize("arch", ["pair", "siamese"])
def test_a_trials_weights_do_not_depend_on_its_job(tmp_path, mnist_splits, draws, arch):
    """A resumed or carried-over run groups the trials it has left into other jobs than an uninterrupted
    run: a trial trained alone, in a job of 4 and in a job of 32 (the CPU's chunks split that one) must
    give the same bytes, so its records' weights digest is one whatever the grouping."""
    widths = dict(nbch1=32, nbch2=32, nbfch=256, batch_norm=True, skip_connections=True)
    variants = ["pair"] if arch == "pair" else ["siamese-2", "siamese-10"]
    lrs = [0.001, 0.01, 0.1, 0.25]
    job = [make_trial(variants[i % len(variants)], widths, TrainConfig(epochs=1, lr=lrs[i % 4]), i % 2, 1 + i // 8)
           for i in range(32)]  # fmt: skip
    write_draws(mnist_splits, tmp_path, n_draws=2, seed=1)
    alone = run_trials(job[5:6], tmp_path, engine="lockstep", workers=1)
    in_4 = run_trials(job[2:6], tmp_path, engine="lockstep", workers=1)
    in_32 = run_lockstep(job, draws)
    assert len(lockstep.group_trials(job, 64)) == 1 and len(in_32) == 32
    assert alone[0].weights == in_4[3].weights
    assert len(alone[0].weights) == 64 and alone[0].weights != in_4[2].weights
    from digitpairs.training.models import weights_digest

    assert weights_digest(in_32[5].state) == alone[0].weights and alone[0].state is None
    assert in_32[5].scores == alone[0].scores == in_4[3].scores
