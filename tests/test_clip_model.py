"""EvaClip: config, forward, optimizer hooks, its own save/load, vision initialisation, and open_clip interop
checked against open_clip's own CustomTextCLIP (same weights -> same embeddings, both directions)."""

from __future__ import annotations

import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

import evamim  # noqa: E402
from evamim.clip import (  # noqa: E402
    ClipConfig,
    EvaClip,
    create_open_clip_model,
    from_open_clip_state_dict,
    load_clip,
    load_open_clip,
    load_open_clip_text,
    load_vision,
    open_clip_config,
    read_clip_config,
    register_timm_trunk,
    save_clip,
    save_open_clip,
    to_open_clip_state_dict,
)
from evamim.engine.optim import param_groups  # noqa: E402
from evamim.models.checkpoint import WeightsMismatchError  # noqa: E402
from evamim.models.presets import PRESETS  # noqa: E402

TEXT = dict(context_length=12, vocab_size=49408, width=32, heads=2, layers=2)
EVA01 = dict(embed_dim=48, depth=2, num_heads=3, img_size=32, patch_size=8)
EVA02 = dict(embed_dim=64, depth=2, num_heads=4, img_size=28, patch_size=14, use_rope=True, rope_ref_grid=(16, 16),
             swiglu=True, mlp_ratio=8 / 3, sub_ln_mlp=True, sub_ln_attn=True)
CASES = {"eva01_token": (EVA01, "token"), "eva01_avg": (EVA01, "avg"), "eva02_token": (EVA02, "token"),
         "eva02_avg": (EVA02, "avg")}


def tiny(vision=EVA01, pool="token", embed_dim=24, **overrides) -> ClipConfig:
    return ClipConfig(vision=dict(vision), pool=pool, embed_dim=embed_dim, text=dict(TEXT), **overrides)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere: unit norms, zero biases and a 0.001-scaled head would hide naming bugs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return module.eval()


def inputs(config: ClipConfig, batch: int = 2):
    images = torch.randn(batch, 3, *config.vision.img_size, generator=torch.Generator().manual_seed(1))
    tokens = EvaClip.tokenizer(_Stub(config))(["a photo of a cat", "a diagram of two dogs"][:batch])
    return images, tokens


class _Stub:
    """What EvaClip.tokenizer reads, without building a model."""

    def __init__(self, config):
        self.config, self.context_length, self.vocab_size = config, config.text["context_length"], 49408


@torch.no_grad()
def assert_same_embeddings(ours: EvaClip, theirs, config: ClipConfig) -> None:
    images, tokens = inputs(config)
    for normalize in (False, True):
        torch.testing.assert_close(ours.encode_image(images, normalize), theirs.encode_image(images, normalize),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.encode_text(tokens, normalize), theirs.encode_text(tokens, normalize),
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.logit_scale, theirs.logit_scale)


# ----------------------------------------------------------------------------------------------- config
def test_config_round_trips_through_json_and_describes_the_trunk_exactly():
    config = ClipConfig(vision="eva02_base_p14", pool="token", embed_dim=512)
    again = ClipConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert config.vision.global_pool == "token" and config.vision.num_classes == 512
    assert config.vision.mim_head_dim is None and not config.vision.use_mask_token
    assert config.text == dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)
    assert config.vision.use_rope and config.depth == 12


@pytest.mark.parametrize("values, message", [
    (dict(pool="max"), "pool must be one of"),
    (dict(embed_dim=0), "embed_dim must be a positive int"),
    (dict(text=dict(hf_model_name="bert-base-uncased")), "Hugging Face text towers are not supported"),
    (dict(text=dict(width=30, heads=4)), "width 30 is not divisible by heads 4"),
    (dict(vision="eva_nope"), "unknown model 'eva_nope'"),
    (dict(vision=dict(embed_dimm=3)), "unknown EvaViTConfig keys"),
    (dict(visual="eva_base_p16"), r"unknown ClipConfig keys \['visual'\]"),
])
def test_config_mistakes_are_refused_in_one_line(values, message):
    with pytest.raises(ValueError, match=message) as error:
        ClipConfig.from_dict(values)
    assert "\n" not in str(error.value)


def test_unknown_text_keys_are_refused_when_the_tower_is_built():
    with pytest.raises(ValueError, match=r"unknown open_clip text_cfg keys \['widht'\]"):
        EvaClip(ClipConfig(vision=EVA01, text=dict(TEXT, widht=3)))


# ----------------------------------------------------------------------------------------------- forward
def test_forward_gives_unit_features_the_exponentiated_scale_and_gradients_everywhere():
    config = tiny()
    model = EvaClip(config)
    images, tokens = inputs(config)
    out = model(images, tokens)
    assert out["image_features"].shape == (2, 24) and out["text_features"].shape == (2, 24)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["logit_scale"], torch.tensor(1 / 0.07))
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    torch.nn.functional.cross_entropy(logits, torch.arange(2)).backward()
    # The token embedding only gets gradients in the rows of the tokens used; every other tensor in full.
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_encode_text_refuses_what_is_not_token_ids():
    model = EvaClip(tiny())
    with pytest.raises(ValueError, match="token ids"):
        model.encode_text(torch.randn(2, 12))
    with pytest.raises(ValueError, match="at most 12"):
        model.encode_text(torch.zeros(2, 13, dtype=torch.long))


def test_the_tokenizer_is_open_clips_and_needs_its_vocabulary():
    model = EvaClip(tiny())
    tokens = model.tokenizer()(["a photo of a cat"])
    assert tokens.shape == (1, 12) and tokens.dtype == torch.long
    torch.testing.assert_close(tokens, open_clip.get_tokenizer("EVA02-B-16", context_length=12)(["a photo of a cat"]))
    with pytest.raises(ValueError, match="vocab_size >= 49408"):
        EvaClip(ClipConfig(vision=EVA01, embed_dim=8, text=dict(TEXT, vocab_size=1000))).tokenizer()


def test_layer_decay_applies_to_the_vision_tower_only():
    model = EvaClip(tiny())
    exempt = model.no_weight_decay()
    assert exempt == {"visual.trunk.pos_embed", "visual.trunk.cls_token", "text.positional_embedding", "logit_scale"}
    groups = param_groups(model, 0.05, layer_decay=0.5)
    scale = {name: (g["lr_scale"], g["weight_decay"]) for g in groups for name in g["param_names"]}
    depth = model.num_layers()
    assert scale["visual.trunk.patch_embed.proj.weight"] == (0.5 ** (depth + 1), 0.05)
    assert scale["visual.trunk.pos_embed"] == (0.5 ** (depth + 1), 0.0)
    assert scale["visual.trunk.blocks.1.attn.qkv.weight"] == (0.5, 0.05)
    assert scale["visual.trunk.head.weight"] == (1.0, 0.05)
    assert scale["text.transformer.resblocks.0.attn.in_proj_weight"] == (1.0, 0.05)
    assert scale["text.positional_embedding"] == (1.0, 0.0)
    assert scale["logit_scale"] == (1.0, 0.0)


def test_clamp_follows_open_clip():
    model = EvaClip(tiny())
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(4.6052, abs=1e-4)


# ------------------------------------------------------------------------------------------ save / load
def test_save_and_load_round_trip(tmp_path):
    config = tiny(EVA02, "avg")
    model = randomize(EvaClip(config))
    directory = save_clip(model, tmp_path / "clip")
    assert json.loads((directory / "config.json").read_text())["kind"] == "clip"
    assert read_clip_config(directory) == config
    loaded = load_clip(directory).eval()
    assert_same_embeddings(loaded, model, config)


def test_load_refuses_weights_that_do_not_fit_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = save_clip(EvaClip(tiny()), tmp_path / "clip")
    state = load_file(str(directory / "model.safetensors"))
    state["text.ln_final.weight"] = torch.ones(7)
    state["extra"] = torch.zeros(1)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 of another shape \(e.g. text.ln_final.weight \(7,\).*1 unused \(extra\)"
                       ) as error:
        load_clip(directory)
    assert "\n" not in str(error.value)
    plain = evamim.save_pretrained(evamim.create_model("eva_tiny_p16", **EVA01), tmp_path / "vit")
    with pytest.raises(ValueError, match="not an EvaClip config"):
        read_clip_config(plain)


def test_vision_tower_from_a_mim_checkpoint_keeps_a_fresh_projection(tmp_path):
    config = tiny()
    # A MIM checkpoint ends in `norm` (no fc_norm), as the official EVA files do.
    mim = randomize(evamim.create_model("eva_tiny_p16", **EVA01, global_pool="token", mim_head_dim=16,
                                        use_mask_token=True), seed=3)
    model = EvaClip(config)
    projection = model.visual.trunk.head.weight.clone()
    report = load_vision(model, mim.state_dict())
    assert report.ok and "lm_head.weight" in report.dropped and "mask_token" in report.dropped
    trunk = model.visual.trunk.state_dict()
    for key, value in mim.state_dict().items():
        if not key.startswith(("lm_head", "mask_token", "head")):
            torch.testing.assert_close(trunk[key], value, msg=key)
    torch.testing.assert_close(model.visual.trunk.head.weight, projection)


def test_vision_tower_from_a_clip_checkpoint_takes_its_projection(tmp_path):
    config = tiny(EVA02)
    source = randomize(EvaClip(config), seed=4)
    model = EvaClip(config)
    for checkpoint in (save_clip(source, tmp_path / "clip"), to_open_clip_state_dict(source)):
        load_vision(model, checkpoint)
        torch.testing.assert_close(model.visual.trunk.state_dict(), source.visual.trunk.state_dict())


def test_vision_tower_of_another_shape_is_refused_and_nothing_changes():
    model = EvaClip(tiny())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = evamim.create_model("eva_tiny_p16", **dict(EVA01, embed_dim=60))
    with pytest.raises(WeightsMismatchError, match="another shape") as error:
        load_vision(model, other.state_dict())
    assert "\n" not in str(error.value)
    torch.testing.assert_close(model.state_dict(), before)
    with pytest.raises(WeightsMismatchError, match="head"):  # a CLIP projection asked for, none in the file
        load_vision(model, evamim.create_model("eva_tiny_p16", **EVA01).state_dict(), projection=True)


# ------------------------------------------------------------------------------------------ open_clip
@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_weights_give_open_clip_the_same_embeddings(case, tmp_path):
    vision, pool = CASES[case]
    config = tiny(vision, pool)
    ours = randomize(EvaClip(config))
    # open_clip's own factory, from the config JSON evamim writes.
    (tmp_path / f"evamim-test-{case}.json").write_text(json.dumps(open_clip_config(config)))
    register_timm_trunk(config)
    open_clip.add_model_config(tmp_path / f"evamim-test-{case}.json")
    theirs = open_clip.create_model(f"evamim-test-{case}").eval()
    assert type(theirs).__name__ == "CustomTextCLIP" and type(theirs.visual).__name__ == "TimmModel"
    theirs.load_state_dict(to_open_clip_state_dict(ours), strict=True)
    assert_same_embeddings(ours, theirs, config)


@pytest.mark.parametrize("case", sorted(CASES))
def test_open_clip_weights_give_evaclip_the_same_embeddings(case):
    vision, pool = CASES[case]
    config = tiny(vision, pool)
    theirs = randomize(create_open_clip_model(config), seed=5)
    ours = EvaClip(config).eval()
    ours.load_state_dict(from_open_clip_state_dict(theirs.state_dict(), config), strict=True)
    assert_same_embeddings(ours, theirs, config)


def test_open_clip_directory_and_training_checkpoint(tmp_path):
    config = tiny(EVA02)
    ours = randomize(EvaClip(config))
    directory = save_open_clip(ours, tmp_path / "oc")
    register_timm_trunk(config)
    theirs = open_clip.create_model(f"local-dir:{directory}").eval()  # loads the weights strictly itself
    assert_same_embeddings(ours, theirs, config)
    # An open_clip training checkpoint: 'state_dict' container, DDP's 'module.' prefix.
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, path)
    assert_same_embeddings(load_open_clip(path, config).eval(), theirs, config)


def test_an_open_clip_state_dict_of_another_architecture_is_refused_in_one_line():
    theirs = create_open_clip_model(tiny(EVA01)).state_dict()
    for other, message in ((tiny(EVA01, embed_dim=16), "of another shape"),
                           (tiny(dict(EVA01, depth=3)), "missing")):
        with pytest.raises(ValueError, match=f"does not fit this EvaClip config: .*{message}") as error:
            from_open_clip_state_dict(theirs, other)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"unused \(logit_bias\)"):
        from_open_clip_state_dict({**theirs, "logit_bias": torch.zeros(())}, tiny(EVA01))
    with pytest.raises(ValueError, match="no open_clip EVA vision tower"):
        from_open_clip_state_dict({k: v for k, v in theirs.items() if not k.startswith("visual.")}, tiny(EVA01))


def test_the_layout_is_that_of_open_clips_own_eva_configs():
    """EVA02-B-16 is eva02_base_p14 at patch 16 with sub-LN in attention too, pooled on the cls token."""
    reference = open_clip.get_model_config("EVA02-B-16")
    config = ClipConfig(vision=dict(PRESETS["eva02_base_p14"], patch_size=16, sub_ln_attn=True),
                        pool="token", embed_dim=reference["embed_dim"], text=reference["text_cfg"])
    with torch.device("meta"):
        theirs = open_clip.create_model("EVA02-B-16", device="meta").state_dict()
        ours = to_open_clip_state_dict(EvaClip(config))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_text_tower_from_a_plain_open_clip_clip():
    """EVA-CLIP-g's recipe: the text tower (and logit scale) of an OpenAI-layout CLIP."""
    vision_cfg = dict(image_size=32, patch_size=16, width=32, layers=1, head_width=16)
    source = randomize(open_clip.CLIP(embed_dim=24, vision_cfg=vision_cfg, text_cfg=dict(TEXT)), seed=6)
    model = EvaClip(tiny())
    summary = load_open_clip_text(model, source.state_dict())
    assert "logit_scale" in summary
    _, tokens = inputs(model.config)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), source.encode_text(tokens), atol=1e-5, rtol=1e-5)
    wider = EvaClip(tiny(embed_dim=40))
    with pytest.raises(ValueError, match="text.text_projection"):
        load_open_clip_text(wider, source.state_dict())
    load_open_clip_text(wider, source.state_dict(), projection=False, logit_scale=False)
    torch.testing.assert_close(wider.text.ln_final.weight, source.ln_final.weight)
