"""The card defense: pruning and masks, LRR vs LTH, resume, decks and their gate, caching, sizes."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import robench
from robench.cell import ModelKey
from robench.context import Context, DataShape, ImageData
from robench.execute.efficiency import measure
from robench.execute.modelcache import ModelCache, data_fingerprint
from robench.execute.modelcheck import check_model
from robench.plugins.card import CARD, build
from robench.plugins.card.augment import FamilyLoss
from robench.plugins.card.binary import BITMAP_FP32, encoded_bytes
from robench.plugins.card.build import build_card, family_signature
from robench.plugins.card.deck import CardDeck
from robench.plugins.card.prune import (
    alive,
    keep_masks,
    kept_after,
    make_permanent,
    mask_of,
    masks,
    prunable,
    prune_round,
    rewind_weights,
    sparsity,
    weights_of,
)
from robench.testing import TINY_SHAPE, tiny_context, tiny_model
from robench.training import Schedule

FAST = {
    "epochs": 2,
    "round_epochs": 1,
    "rounds": 2,
    "sparsity": 0.5,
    "lr": 0.05,
    "batch_size": 32,
    "milestones": [0.5],  # the round schedule is the last epoch: lr x 0.1
    "signature_images": 64,
}


def card_defense(**params: Any) -> CARD:
    return CARD.create({**CARD.presets["smoke"], **FAST, **params})


# -- pruning and masks ------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_pruning_hits_the_target_sparsity_exactly(scope: str) -> None:
    model = tiny_model()
    total = alive(model)[1]
    for r in range(1, 4):
        prune_round(model, 0.9, r, 3, scope)  # type: ignore[arg-type]
        if scope == "global":
            assert alive(model)[0] == kept_after(total, 0.9, r, 3)
        else:
            for _, layer in prunable(model):
                assert int(mask_of(layer).sum()) == kept_after(layer.weight.numel(), 0.9, r, 3)
    make_permanent(model)
    assert abs(sparsity(model) - 0.9) < 0.01
    assert not any(name.endswith("_orig") for name in model.state_dict()), "masks folded into the weights"


def test_masks_survive_rewinding_and_every_fine_tuning_step(tmp_path: Path) -> None:
    ctx = tiny_context(tmp_path)
    model = ctx.new_model()
    init = weights_of(model)
    prune_round(model, 0.8, 1, 2, "global")
    before = masks(model)
    rewind_weights(model, init)
    assert all(torch.equal(before[n], mask_of(m)) for n, m in prunable(model)), "rewinding keeps the masks"
    steps = []

    def checked(m: nn.Module) -> None:  # after every optimizer step: masks unchanged, pruned weights zero
        keep_masks(m)
        for name, layer in prunable(m):
            assert torch.equal(mask_of(layer), before[name])
            assert not layer.weight_orig[before[name] == 0].any()
        steps.append(1)

    # momentum and weight decay would move pruned entries if nothing re-applied the masks
    schedule = Schedule(epochs=2, batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-3)
    robench.train(model, ctx, schedule, after_step=checked)
    assert len(steps) == 8
    assert abs(sparsity(model) - (1 - kept_after(alive(model)[1], 0.8, 1, 2) / alive(model)[1])) < 1e-9


def test_lrr_and_lth_differ_only_in_what_they_rewind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, list[dict[str, Any]]] = {"lrr": [], "lth": []}
    real_train = build.train

    def recording(model: nn.Module, ctx: Context, schedule: Schedule, **kw: Any) -> nn.Module:
        calls[method].append(
            {
                "phase": kw["desc"].replace(method, "M"),
                "schedule": schedule,
                "loss": kw["loss"].identity(),
                "masks": masks(model),
                "weights": {n: w.clone() for n, w in weights_of(model).items()},
                "seed": ctx.seed,
            }
        )
        return real_train(model, ctx, schedule, **kw)

    monkeypatch.setattr(build, "train", recording)
    for method in ("lrr", "lth"):
        recipe = card_defense(method=method, families=("gaussian",)).recipe()
        build_card(tiny_context(tmp_path / method), recipe, "gaussian", 0, "card")
    lrr, lth = calls["lrr"], calls["lth"]
    assert (
        [c["phase"] for c in lrr] == [c["phase"] for c in lth] == ["card dense", "card M round 1/2", "card M round 2/2"]
    )
    for a, b in zip(lrr, lth, strict=True):
        assert (a["schedule"], a["loss"], a["seed"]) == (b["schedule"], b["loss"], b["seed"])
    for a, b in zip(lrr[:2], lth[:2], strict=True):  # round 2 prunes weights that round 1 trained apart
        assert all(torch.equal(a["masks"][n], b["masks"][n]) for n in a["masks"])
    assert all(torch.equal(lrr[0]["weights"][n], lth[0]["weights"][n]) for n in lrr[0]["weights"]), "same init"
    init = lrr[0]["weights"]
    # round 1 starts from the same mask of the same dense weights: LTH at init, LRR where training ended
    m1 = lth[1]["masks"]
    for name, w in lth[1]["weights"].items():
        layer = name.removesuffix(".weight")
        expected = init[name] * m1[layer] if layer in m1 and name.endswith("weight") else init[name]
        assert torch.equal(w, expected), f"LTH rewinds {name} to its initial value"
    assert any(not torch.equal(lrr[1]["weights"][n], lth[1]["weights"][n]) for n in init), (
        "LRR keeps the trained weights"
    )
    assert lrr[1]["schedule"].lr == lrr[0]["schedule"].lr * 0.1, "the rewound LR is that of the last epoch(s)"


def test_a_pruning_round_killed_mid_way_resumes_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROBENCH_CHECKPOINT_SECONDS", "0")  # a checkpoint after every batch
    recipe = card_defense(families=("augmix",)).recipe()
    (tmp_path / "whole").mkdir()
    (tmp_path / "killed").mkdir()  # the build's scratch folder: where checkpoints go
    whole = build_card(tiny_context(tmp_path / "whole"), recipe, "augmix", 0, "card")
    real_call, count = FamilyLoss.__call__, [0]

    def dying(self: FamilyLoss, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        count[0] += 1
        if count[0] == 14:  # 4 batches per epoch: 8 dense, 4 in round 1, the 2nd batch of round 2
            raise KeyboardInterrupt
        return real_call(self, model, x, y)

    monkeypatch.setattr(FamilyLoss, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        build_card(tiny_context(tmp_path / "killed"), recipe, "augmix", 0, "card")
    assert list((tmp_path / "killed").glob("train-card-lrr-round-2-2-*.pt")), "round 2 left its checkpoint"
    count[0] = -(10**6)
    resumed = build_card(tiny_context(tmp_path / "killed"), recipe, "augmix", 0, "card")
    assert count[0] == -(10**6) + 3, "the rerun trained only the rest of round 2"
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# -- decks --------------------------------------------------------------------------------


def members(k: int = 3, shape: DataShape = TINY_SHAPE) -> list[nn.Module]:
    return [tiny_model(shape, seed=s) for s in range(k)]


def test_average_deck_is_the_log_of_the_mean_of_its_members_softmax() -> None:
    cards = members()
    deck = CardDeck(cards, [0, 0, 1], "average").eval()
    x = torch.rand(16, 1, 12, 12)
    with torch.no_grad():
        expected = torch.stack([c(x).softmax(1) for c in cards]).mean(0)
        out = deck(x)
    assert torch.allclose(out.exp(), expected, atol=1e-6)
    assert torch.allclose(out, expected.log(), atol=1e-5)
    assert not torch.allclose(out.exp().sum(1), torch.full((16,), 2.0)), "log-probabilities, not probabilities"
    assert (out <= 0).all()


def smooth_data(n: int, seed: int) -> ImageData:
    """Smooth 28x28 grey images (upsampled 7x7 noise): natural-image-like spectra."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 7, 7, generator=g)
    images = F.interpolate(low, size=28, mode="bicubic", align_corners=False).clamp(0, 1)
    return ImageData((images * 255).round().to(torch.uint8), torch.randint(0, 4, (n,), generator=g))


def spectral_deck(tmp: Path, gate: str) -> tuple[CardDeck, ImageData]:
    defense = card_defense(gate=gate, signature_images=256)
    shape = dataclasses.replace(TINY_SHAPE, height=28, width=28)
    ctx = dataclasses.replace(tiny_context(tmp), train=smooth_data(512, 0), shape=shape)
    signatures = torch.stack([family_signature(ctx, defense.recipe(), f, 256) for f in defense.families])
    deck = CardDeck(members(4, shape), [0, 0, 1, 1], "spectral", gate, signatures)  # type: ignore[arg-type]
    return deck.eval(), smooth_data(64, 1)


def blurred(x: Tensor) -> Tensor:
    from torchvision.transforms.functional import gaussian_blur

    return gaussian_blur(x, kernel_size=5, sigma=1.5)


def noisy(x: Tensor, sigma: float = 0.1) -> Tensor:
    return (x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)


@pytest.mark.parametrize("gate", ["sample", "batch"])
def test_spectral_gate_picks_noise_cards_for_noise_and_augmix_cards_for_blur(tmp_path: Path, gate: str) -> None:
    deck, test = spectral_deck(tmp_path, gate)
    x = test.batch(torch.arange(64))[0]
    augmix, gaussian = 0, 1  # the defense's family order
    assert (deck.choose(noisy(x)) == gaussian).float().mean() >= 0.95
    assert (deck.choose(blurred(x)) == augmix).float().mean() >= 0.95
    with torch.no_grad():  # the output is the chosen family's average
        noise_cards = [deck.cards[2], deck.cards[3]]
        expected = torch.stack([c(noisy(x)).softmax(1) for c in noise_cards]).mean(0).log()
        assert torch.allclose(deck(noisy(x)), expected, atol=1e-5)


def test_batch_gate_is_flagged_as_batch_dependent_and_the_per_sample_gate_is_not(tmp_path: Path) -> None:
    deck, test = spectral_deck(tmp_path, "batch")
    x = test.batch(torch.arange(32))[0]
    # half noise, half blur: the batch's mean spectrum picks one family, each half its own
    mixed = torch.cat([noisy(x[:16], 0.2), blurred(x[16:])])
    y = torch.zeros(32, dtype=torch.long)
    batch = check_model(robench.Variant("deck", deck), mixed, y, 4)
    deck.gate = "sample"
    sample = check_model(robench.Variant("deck", deck), mixed, y, 4)
    assert batch.batch_dependent and "batch_dependent" in batch.fired(False)
    assert not sample.batch_dependent and sample.fired(False) == []
    with torch.no_grad():  # per-sample gating = every sample gated as a batch of one
        alone = torch.cat([deck(mixed[i : i + 1]) for i in range(len(mixed))])
        assert torch.allclose(deck(mixed), alone, atol=1e-5)


# -- the defense: variants, caching, sizes --------------------------------------------------


def test_variants_presets_and_validation() -> None:
    for values in CARD.presets.values():
        CARD.create(dict(values))
    assert CARD.create({}).variant_names() == ("card-augmix", "card-gaussian", "deck-average", "deck-spectral")
    assert CARD.create({"families": ["augmix"]}).variant_names() == ("card-augmix",)
    three = CARD.create({"families": ["gaussian"], "cards_per_family": 2, "deck": "average"})
    assert three.variant_names() == ("card-gaussian-0", "card-gaussian-1", "deck-average")
    for bad, message in [
        ({"method": "dense"}, "sparsity = 0"),
        ({"sparsity": 0.0}, "sparsity = 0"),
        ({"families": ["augmix"], "deck": "spectral"}, "two families"),
        ({"round_epochs": 500}, "cannot exceed"),
    ]:
        with pytest.raises((ValueError, robench.ConfigError), match=message):
            CARD.create(bad)


def test_fit_saves_and_reloads_through_the_model_cache(tmp_path: Path) -> None:
    defense = card_defense()
    key = ModelKey("tiny", "tiny", "card", defense.canonical(), "card", 0, "smoke", defense.model_revision())
    cache = ModelCache(tmp_path / "cache")
    ctx = tiny_context(tmp_path / "work")
    fingerprint = data_fingerprint(ctx.train)

    def context() -> Context:
        return dataclasses.replace(ctx, cache_dir=tmp_path / "scratch")

    built, seconds, _ = cache.get(key, defense, context, fingerprint)
    loaded, again, _ = cache.get(key, defense, context, fingerprint)
    assert seconds > 0 and again == 0.0
    assert set(built) == set(loaded) == set(defense.variant_names())
    x = ctx.train.batch(torch.arange(32))[0]
    with torch.no_grad():
        for name in built:
            assert torch.equal(built[name].eval()(x), loaded[name](x)), name
    assert torch.equal(built["deck-spectral"].signatures, loaded["deck-spectral"].signatures)
    assert built["deck-spectral"].signatures.abs().sum() > 0


def test_efficiency_columns_see_the_sparsity_and_the_encoding(tmp_path: Path) -> None:
    defense = card_defense(families=("gaussian",), sparsity=0.8)
    (model,) = defense.fit(tiny_context(tmp_path)).values()
    variant = defense.variant("card-gaussian", model.eval())
    eff = measure(variant.model, torch.rand(1, 1, 12, 12), bits=variant.bits, model_bytes=variant.model_bytes)
    weights = sum(layer.weight.numel() for _, layer in prunable(model))
    others = eff.params - weights
    assert eff.nonzero_params <= others + weights - round(0.8 * weights) + 1
    assert variant.encoding == BITMAP_FP32 and eff.model_bytes == encoded_bytes(model, BITMAP_FP32)
    buffers = sum(b.numel() for b in model.buffers())  # the normalisation's mean and std
    assert eff.model_bytes == 4 * (others + buffers) + math.ceil(weights / 8) + 4 * (weights - round(0.8 * weights))
    assert eff.model_bytes < eff.params * 4 * 0.4


def test_binary_cards_have_two_weight_values_per_layer_at_the_target_sparsity(tmp_path: Path) -> None:
    defense = card_defense(method="biprop", families=("gaussian",), sparsity=0.5, epochs=2)
    (model,) = defense.fit(tiny_context(tmp_path)).values()
    for _, layer in prunable(model):
        w = layer.weight.detach()
        assert abs(float((w == 0).float().mean()) - 0.5) < 0.02
        assert len(w[w != 0].abs().unique()) == 1, "one scale alpha per layer: weights are +-alpha"
    variant = defense.variant("card-gaussian", model)
    assert variant.bits == 1 and variant.encoding == "bitmap-sign"
    assert variant.model_bytes < encoded_bytes(model, BITMAP_FP32)


def test_a_diverged_build_fails_naming_its_phase(tmp_path: Path) -> None:
    defense = card_defense(method="dense", sparsity=0.0, families=("gaussian",), lr=1e8)
    with pytest.raises(RuntimeError, match="card-gaussian dense diverged"):
        defense.fit(tiny_context(tmp_path))
