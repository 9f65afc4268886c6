"""The study's experiments as functions of params: which trials to run and how to tabulate them."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, replace
from pathlib import Path

from digitpairs.core.params import GRID_KEYS
from digitpairs.core.paths import PAIRS_DIR
from digitpairs.core.stats import ci95, mean_std
from digitpairs.core.variants import (
    ALL_ADDITIONS,
    GRID_ARCHS,
    NO_ADDITIONS,
    PLUS,
    STUDY_VARIANTS,
    VARIANTS,
    additions,
    variant_score,
    variants_of,
)
from digitpairs.training.runner import run_trials
from digitpairs.training.semantics import TrainConfig, resolve_device
from digitpairs.training.trials import Outcome, Trial, make_trial

import pandas as pd

CONFIG_KEYS = GRID_KEYS  # what a selected configuration holds: widths, switches and lr
WIDTH_KEYS = ("nbch1", "nbch2", "nbfch", "batch_norm", "skip_connections")
# the recipe section's training keys, TrainConfig's fields of the same names
RECIPE_KEYS = (
    "batch_size",
    "momentum",
    "nesterov",
    "weight_decay",
    "schedule",
    "label_smoothing",
    "shift",
    "elastic",
    "elastic_sigma",
    "cutout",
    "dropout",
    "ema",
    "tta",
)


def train_config(train: dict, lr: float) -> TrainConfig:
    """Optimisation settings shared by every stage (``train`` section) with a given lr."""
    return TrainConfig(lr=lr, epochs=train["epochs"], batch_size=train["batch_size"], shuffle=train["shuffle"])


def recipe_config(params: dict, lr: float) -> TrainConfig:
    """siamese-plus's training: the ``recipe`` section's optimiser, schedule, smoothing and augmentations,
    with the study's epochs and shuffling (its budget)."""
    r, train = params["recipe"], params["train"]
    return TrainConfig(lr=lr, epochs=train["epochs"], shuffle=train["shuffle"], **{k: r[k] for k in RECIPE_KEYS})


def config_of(variant: str, lr: float, params: dict) -> TrainConfig:
    """The training settings of ``variant`` at learning rate ``lr``."""
    return recipe_config(params, lr) if variant == PLUS else train_config(params["train"], lr)


def widths(config: dict, train: dict) -> dict:
    """Model-config keyword arguments of a configuration, with the ``relu_logits`` switch."""
    return {**{k: config[k] for k in WIDTH_KEYS}, "relu_logits": train["relu_logits"]}


def grid(cv: dict) -> list[dict]:
    """Every combination of the grid lists in the ``cv`` section, in a fixed order."""
    return [dict(zip(GRID_KEYS, combo, strict=True)) for combo in itertools.product(*(cv[k] for k in GRID_KEYS))]


def cv_trials(arch: str, params: dict) -> list[Trial]:
    """SPEC experiment 1 for one architecture: grid x variants x the first ``cv.n_draws`` draws."""
    cv, train = params["cv"], params["train"]
    return [
        make_trial(v.name, widths(c, train), train_config(train, c["lr"]), draw, cv["seed"])
        for c in grid(cv)
        for v in variants_of(arch)
        for draw in range(cv["n_draws"])
    ]


def score_columns(o: Outcome, score_on: str) -> dict:
    """The variant's accuracy on validation and test pairs, and the one used for scoring."""
    val, test = (variant_score(o.trial.variant, o.scores[s]) for s in ("val", "test"))
    return {
        "score_on": score_on,
        "score": val if score_on == "val" else test,
        "val_accuracy": val,
        "test_accuracy": test,
    }


def cv_table(outcomes: list[Outcome], score_on: str) -> pd.DataFrame:
    """Tidy CV results: one row per combination, variant and draw."""
    rows = []
    for o in outcomes:
        m, t = o.trial.model, o.trial.train
        config = {k: getattr(m, k) for k in WIDTH_KEYS} | {"lr": t.lr}
        rows.append(
            {"variant": o.trial.variant, "arch": m.arch, **config, "draw": o.trial.draw} | score_columns(o, score_on)
        )
    return pd.DataFrame(rows)


def select(table: pd.DataFrame) -> dict[str, dict]:
    """Per variant, the configuration with the best mean score over draws (first in grid order on ties)."""
    out = {}
    for variant, df in table.groupby("variant", sort=True):
        summary = [(config, *mean_std(g["score"]), len(g)) for config, g in df.groupby(list(CONFIG_KEYS), sort=False)]
        config, mean, std, n = max(summary, key=lambda s: s[1])  # max keeps the first of equals
        out[variant] = {
            **{k: _plain(v) for k, v in zip(CONFIG_KEYS, config, strict=True)},
            "score_mean": mean,
            "score_std": std,
            "n_draws": n,
            "score_on": df["score_on"].iloc[0],
        }
    return out


def _plain(v):
    """numpy scalars to plain Python, so JSON files are stable."""
    return v.item() if hasattr(v, "item") else v


def read_selected(cv_dir: Path, recipe: Path | None = None) -> dict[str, dict]:
    """Selected configuration of the study's variants (the ``cv`` stage's JSON files) and, given the
    ``recipe`` stage's file, of siamese-plus."""
    selected = {}
    for arch in GRID_ARCHS:
        selected |= json.loads((Path(cv_dir) / f"{arch}_selected.json").read_text())
    missing = set(STUDY_VARIANTS) - set(selected)
    if missing:
        raise ValueError(f"{cv_dir} has no selected configuration for {sorted(missing)}; rerun `dvc repro cv`.")
    if recipe is not None:
        selected |= json.loads(Path(recipe).read_text())
        if PLUS not in selected:
            raise ValueError(f"{recipe} has no selected configuration for {PLUS}; rerun `dvc repro recipe`.")
    return selected


def recipe_trials(params: dict) -> list[Trial]:
    """siamese-plus's search: the ``recipe`` grid with the recipe's training, on its first draws."""
    r = params["recipe"]
    return [
        make_trial(PLUS, widths(c, params["train"]), recipe_config(params, c["lr"]), draw, r["seed"])
        for c in grid(r)
        for draw in range(r["n_draws"])
    ]


def ablations(tc: TrainConfig, study_batch_size: int) -> dict[str, TrainConfig]:
    """The selected recipe without one addition at a time (only those it makes: ``core.variants.ADDITIONS``).
    Without momentum there is no Nesterov either, and the lr is divided by (1 - momentum), so each step
    still moves as far."""
    out = {}
    for row, key, study in additions(asdict(tc), study_batch_size):
        out[row] = replace(tc, **{key: study})
        if key == "momentum":
            out[row] = replace(out[row], nesterov=False, lr=tc.lr / (1 - tc.momentum))
    return out


def ablation_trials(selected: dict, params: dict) -> tuple[list[str], list[Trial]]:
    """The recipe's ablation on the first ``recipe.ablation_draws`` draws: one name per trial. Besides
    the full recipe, one row trains siamese-plus's network the study's way (siamese-10's lr, plain SGD)
    and every other row drops one addition."""
    r, train, config = params["recipe"], params["train"], selected[PLUS]
    base = make_trial(PLUS, widths(config, train), recipe_config(params, config["lr"]), 0, r["seed"])
    study = replace(train_config(train, selected["siamese-10"]["lr"]), w2=base.train.w2, w10=base.train.w10)
    rows = {ALL_ADDITIONS: base.train, NO_ADDITIONS: study} | ablations(base.train, train["batch_size"])
    names, trials = [], []
    for name, tc in rows.items():
        for draw in range(r["ablation_draws"]):
            names.append(name)
            trials.append(replace(base, train=tc, draw=draw))
    return names, trials


def ablation_table(names: list[str], outcomes: list[Outcome]) -> pd.DataFrame:
    """Tidy ablation results: validation accuracy of both decision rules per row and draw."""
    rows = []
    for name, o in zip(names, outcomes, strict=True):
        val = o.scores["val"]
        rows.append(
            {
                "ablation": name,
                "draw": o.trial.draw,
                "lr": o.trial.train.lr,
                "argmax": val["digit_comparison_accuracy"],
                "posterior": val["digit_posterior_accuracy"],
            }
        )
    return pd.DataFrame(rows)


def select_on_test(table: pd.DataFrame) -> dict[str, dict]:
    """The original's protocol: per variant, the configuration with the best mean *test* accuracy."""
    return select(table.assign(score=table["test_accuracy"], score_on="test"))


def control_trials(selected: dict, test_selected: dict, params: dict) -> tuple[list[str], list[Trial]]:
    """What the findings need beyond the study's runs, one kind per trial:

    - ``no_aux``: the siamese model at siamese-2's configuration with loss weights (1, 0) on every draw,
      the control of the final siamese-2 models (the same trials but for w10);
    - ``test_selected``: each study variant's test-selected configuration on the draws that cross-
      validation never saw, to measure how optimistic the original's protocol is.
    """
    train, cv, n = params["train"], params["cv"], params["data"]["n_draws"]
    s2 = selected["siamese-2"]
    base = make_trial("siamese-2", widths(s2, train), train_config(train, s2["lr"]), 0, train["seed"])
    kinds = ["no_aux"] * n
    trials = [replace(base, train=replace(base.train, w10=0.0), draw=d) for d in range(n)]
    for v in STUDY_VARIANTS:
        c = test_selected[v]
        unseen = range(cv["n_draws"], n)
        kinds += ["test_selected"] * len(unseen)
        trials += [make_trial(v, widths(c, train), train_config(train, c["lr"]), d, cv["seed"]) for d in unseen]
    return kinds, trials


def control_table(kinds: list[str], outcomes: list[Outcome]) -> pd.DataFrame:
    """Tidy control results: kind, variant, configuration, draw and the variant's accuracies."""
    table = cv_table(outcomes, "test")
    table.insert(0, "kind", kinds)
    return table


def loss_weight_trials(selected: dict, params: dict) -> list[Trial]:
    """SPEC experiment 2: the siamese model at siamese-2's configuration, loss weights (1, 10^e)
    for each exponent, plus (1, 0) when ``include_zero``, on the first ``n_draws`` draws."""
    lw, train = params["loss_weights"], params["train"]
    config = selected["siamese-2"]
    weights = [(1.0, 10.0**e) for e in lw["exponents"]] + ([(1.0, 0.0)] if lw["include_zero"] else [])
    base = make_trial("siamese-2", widths(config, train), train_config(train, config["lr"]), 0, lw["seed"])
    return [
        replace(base, train=replace(base.train, w2=w2, w10=w10), draw=draw)
        for w2, w10 in weights
        for draw in range(lw["n_draws"])
    ]


def loss_weight_table(outcomes: list[Outcome], exponents: list[float], score_on: str) -> pd.DataFrame:
    """Tidy sweep results: the comparison head's accuracy per loss weight and draw."""
    by_w10 = {10.0**e: e for e in exponents}
    rows = []
    for o in outcomes:
        t = o.trial.train
        rows.append(
            {"exponent": by_w10.get(t.w10), "w2": t.w2, "w10": t.w10, "ratio": t.w10 / t.w2, "draw": o.trial.draw}
            | score_columns(o, score_on)
        )
    return pd.DataFrame(rows)


def grad_norm_trials(selected: dict, params: dict) -> list[Trial]:
    """SPEC experiment 3: each architecture's selected configuration (pair; siamese-2 for the
    siamese model) with every (batch_norm, skip_connections) pair, once, on one draw."""
    g, train = params["grad_norms"], params["train"]
    trials = []
    for variant in ("pair", "siamese-2"):
        config = selected[variant]
        for bn, skip in itertools.product((False, True), repeat=2):
            w = widths(config, train) | {"batch_norm": bn, "skip_connections": skip}
            trials.append(make_trial(variant, w, train_config(train, config["lr"]), g["draw"], g["seed"]))
    return trials


def grad_norm_table(outcomes: list[Outcome]) -> pd.DataFrame:
    """Tidy gradient norms: one row per trial, mini-batch and weight tensor."""
    frames = []
    for o in outcomes:
        r, m = o.result, o.trial.model
        steps, layers = r.grad_norms.shape
        frames.append(
            pd.DataFrame(
                {
                    "variant": o.trial.variant,
                    "arch": m.arch,
                    "batch_norm": m.batch_norm,
                    "skip_connections": m.skip_connections,
                    "step": [s for s in range(steps) for _ in range(layers)],
                    "depth": list(range(layers)) * steps,
                    "layer": r.grad_names * steps,
                    "norm": r.grad_norms.flatten().tolist(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def final_trials(selected: dict, params: dict, variants: tuple[str, ...] = tuple(VARIANTS)) -> list[Trial]:
    """SPEC experiment 4: each of ``variants`` (default: all four) at its selected configuration on every draw."""
    train = params["train"]
    return [
        make_trial(v, widths(selected[v], train), config_of(v, selected[v]["lr"], params), draw, train["seed"])
        for v in variants
        for draw in range(params["data"]["n_draws"])
    ]


def final_metrics(scores: pd.DataFrame, selected: dict, variants: tuple[str, ...] = tuple(VARIANTS)) -> dict:
    """``metrics.json``: per variant, test accuracy mean, std, 95% CI over draws, and its config."""
    out = {}
    for variant in variants:
        acc = scores.loc[scores["variant"] == variant, "accuracy"]
        mean, std = mean_std(acc)
        low, high = ci95(acc)
        config = {k: selected[variant][k] for k in CONFIG_KEYS}
        out[variant] = {
            "accuracy_mean": mean,
            "accuracy_std": std,
            "ci95_low": low,
            "ci95_high": high,
            "n_draws": len(acc),
            "config": config,
        }
    return out


def run(trials: list[Trial], params: dict, executor: str, desc: str, **kwargs) -> list[Outcome]:
    """Train ``trials`` with the engine and device of the ``train`` section."""
    train = params["train"]
    device = resolve_device(train["device"]).type
    return run_trials(trials, PAIRS_DIR, engine=train["engine"], executor=executor, device=device, desc=desc, **kwargs)
