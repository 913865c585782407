"""Official EVA-CLIP checkpoints (github.com/baaivision/EVA, EVA-CLIP/rei/eva_clip): their state dicts load into an
EvaClip with the same embeddings, every key mapped or the load refused; the official model configs translate.

The official state dicts are built here by renaming a tiny EvaClip's tensors into the names the official modules
give them (see ``official_state_dict``), since the real files are gigabytes."""

from __future__ import annotations

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from test_clip_model import EVA01, EVA02, assert_same_embeddings, randomize, tiny  # noqa: E402
from test_model_checkpoint import official_rope_tables  # noqa: E402

from evamim.clip import EvaClip, load_clip, save_clip  # noqa: E402
from evamim.clip.checkpoint import load_clip_weights  # noqa: E402
from evamim.clip.official import OFFICIAL_MODEL_CONFIGS, official_clip_config  # noqa: E402
from evamim.models.checkpoint import WeightsMismatchError  # noqa: E402


def official_vision_names(key: str, value: torch.Tensor, *, subln: bool, swiglu: bool) -> dict[str, torch.Tensor]:
    """One evamim trunk tensor -> its EVA-CLIP ``EVAVisionTransformer`` name(s) (eva_clip/eva_vit_model.py):
    ``Attention`` with ``subln`` holds ``q_proj`` / ``k_proj`` / ``v_proj`` (no bias) and ``inner_attn_ln``,
    without it one ``qkv``; both keep ``q_bias`` / ``v_bias``. ``SwiGLU`` (``naiveswiglu``) holds ``w1`` (gate,
    through SiLU), ``w2`` (value), ``ffn_ln``, ``w3``; ``Mlp`` ``fc1`` / ``fc2``. ``gamma_1`` / ``gamma_2``,
    ``norm`` and ``head`` (the projection, ``nn.Linear(width, embed_dim)`` with bias) keep evamim's names."""
    if subln and key.endswith(".attn.qkv.weight"):
        return {key.replace("qkv.weight", f"{name}_proj.weight"): part for name, part in zip("qkv", value.chunk(3))}
    if swiglu and ".mlp.fc1." in key:
        gate, val = value.chunk(2)
        return {key.replace("mlp.fc1.", "mlp.w1."): gate, key.replace("mlp.fc1.", "mlp.w2."): val}
    if swiglu:
        key = key.replace("mlp.fc2.", "mlp.w3.").replace("mlp.norm.", "mlp.ffn_ln.")
    return {key.replace("attn.norm.", "attn.inner_attn_ln."): value}


def official_state_dict(model: EvaClip, layout: str = "custom") -> dict[str, torch.Tensor]:
    """``model``'s weights in an official EVA-CLIP file's layout:

    - ``visual.*``: ``official_vision_names``; EVA-02 towers also store the RoPE buffers of their one
      ``VisionRotaryEmbeddingFast`` (eva_clip/rope.py: ``freqs_cos`` / ``freqs_sin``, ``pt_seq_len`` 16,
      ``ft_seq_len`` the grid with ``intp_freq``) under ``visual.rope.`` and, as every ``Attention`` holds the
      same module, under ``visual.blocks.{i}.attn.rope.``;
    - ``custom`` (eva_clip/model.py ``CustomCLIP``, EVA-CLIP's ``--force-custom-clip``): the ``TextTransformer``
      (eva_clip/transformer.py: token_embedding, positional_embedding, transformer.resblocks.{i}.{ln_1,
      attn.in_proj_weight/in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_final, text_projection)
      under ``text.``, ``logit_scale`` at the top;
    - ``clip`` (eva_clip/model.py ``CLIP``): the same text tensors at the top level;
    - ``eva01`` (EVA-01/clip/eva_model.py ``EVA_CLIP``, the eva_clip_psz14.pt file): under ``text.``, with the
      logit scale in the text tower as ``text.logit_scale``.
    """
    config = model.config.vision
    state = {}
    for key, value in model.visual.trunk.state_dict().items():
        for name, tensor in official_vision_names(key, value, subln=config.sub_ln_attn, swiglu=config.swiglu).items():
            state[f"visual.{name}"] = tensor.clone()
    if config.use_rope:
        head_dim = config.embed_dim // config.num_heads
        cos, sin = official_rope_tables(head_dim, pt_seq_len=16, ft_seq_len=config.grid_size[0])
        for prefix in ["visual.rope."] + [f"visual.blocks.{i}.attn.rope." for i in range(config.depth)]:
            state[prefix + "freqs_cos"], state[prefix + "freqs_sin"] = cos.clone(), sin.clone()
    text_prefix = "" if layout == "clip" else "text."
    for key, value in model.text.state_dict().items():
        state[text_prefix + key] = value.clone()
    state["text.logit_scale" if layout == "eva01" else "logit_scale"] = model.logit_scale.detach().clone()
    return state


CASES = {
    "eva01_layer_scale_custom": (dict(EVA01, layer_scale_init=0.1), "custom"),
    "eva01_eva_clip_psz14": (EVA01, "eva01"),
    "eva02_rope_swiglu_subln_clip": (EVA02, "clip"),
    "eva02_rope_at_another_grid": (dict(EVA02, img_size=42), "custom"),  # grid 3, coordinates scaled to 16
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_an_official_state_dict_loads_with_the_same_embeddings(case, tmp_path):
    vision, layout = CASES[case]
    config = tiny(vision, "token")
    source = randomize(EvaClip(config))
    with torch.no_grad():
        source.logit_scale.fill_(3.3)
    state = official_state_dict(source, layout)
    loaded = load_clip(state, config).eval()
    assert_same_embeddings(loaded, source, config)
    # A file in a container, as the official trainer saves (factory.load_state_dict reads model|module|state_dict).
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "official.pt")
    target = EvaClip(config)
    lines = load_clip_weights(target, tmp_path / "official.pt")
    assert_same_embeddings(target.eval(), source, config)
    assert "vision tower" in lines[0] and "logit_scale" in lines[1]


def test_official_position_embeddings_are_resampled_to_the_model_grid():
    """EVA02-CLIP-L-14-336 starts from a 224 file (EVA02_CLIP_L_psz14_224to336): a 336 model takes a 224 state."""
    small = randomize(EvaClip(tiny(EVA02, "token")))
    big = EvaClip(tiny(dict(EVA02, img_size=42), "token"))
    lines = load_clip_weights(big, official_state_dict(small))
    assert "resampled" in lines[0] and "pos_embed" in lines[0]


def test_every_key_is_mapped_or_the_load_is_refused_naming_them_and_the_model_is_unchanged():
    config = tiny(EVA02, "token")
    state = official_state_dict(randomize(EvaClip(config)))
    target = EvaClip(config)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    def refused(mutate, error=ValueError, *fragments):
        broken = dict(state)
        mutate(broken)
        with pytest.raises(error) as info:
            load_clip_weights(target, broken)
        assert "\n" not in str(info.value) and all(f in str(info.value) for f in fragments), str(info.value)
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())

    refused(lambda s: s.update({"visual.rel_pos_bias.relative_position_bias_table": torch.zeros(3, 2)}),
            WeightsMismatchError, "rel_pos_bias.relative_position_bias_table")
    refused(lambda s: s.update({"lm_loss.weight": torch.zeros(2)}), ValueError, "1 unmapped (lm_loss.weight)")
    refused(lambda s: s.pop("text.ln_final.weight"), ValueError, "1 missing (text.ln_final.weight)")
    refused(lambda s: s.pop("visual.blocks.1.norm1.weight"), WeightsMismatchError, "blocks.1.norm1.weight")
    refused(lambda s: s.pop("visual.head.bias"), WeightsMismatchError, "head.bias")
    refused(lambda s: s.update({"text.logit_scale": torch.tensor(1.0)}), ValueError, "both logit_scale and text.")
    # RoPE tables of another reference grid are another function: refused, not silently recomputed.
    other = official_rope_tables(16, pt_seq_len=14, ft_seq_len=2)
    refused(lambda s: s.update({"visual.rope.freqs_cos": other[0], "visual.rope.freqs_sin": other[1]}),
            WeightsMismatchError, "RoPE")
    with pytest.raises(ValueError, match="official EVA-CLIP towers pool the cls token"):
        load_clip_weights(EvaClip(tiny(EVA02, "avg")), state)


def test_load_clip_needs_a_config_for_a_file_and_none_for_a_directory(tmp_path):
    config = tiny()
    model = randomize(EvaClip(config))
    torch.save(official_state_dict(model), tmp_path / "official.pt")
    with pytest.raises(ValueError, match="pass config=, a ClipConfig or an official EVA-CLIP model name"):
        load_clip(tmp_path / "official.pt")
    directory = save_clip(model, tmp_path / "clip")
    with pytest.raises(ValueError, match="do not pass a config"):
        load_clip(directory, config)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip(tmp_path / "nothing.pt", config)
    # The same loader takes an EvaClip directory and open_clip's layout too.
    target = EvaClip(config)
    assert "EvaClip directory" in load_clip_weights(target, directory)[0]
    assert_same_embeddings(target.eval(), model, config)
    with pytest.raises(ValueError, match="not a CLIP checkpoint evamim reads whole"):
        load_clip_weights(target, {"blocks.0.norm1.weight": torch.zeros(3)})


# --------------------------------------------------------------------------------------------- configs
def test_official_model_configs_translate_to_the_official_architectures():
    """Widths, depths, heads and MLP sizes of EVA-CLIP/rei/eva_clip/model_configs/*.json, built on meta."""
    expected = {  # name: (vision width, depth, heads, MLP hidden, patch, image, text width, text layers, embed)
        "EVA01-CLIP-B-16": (768, 12, 12, 3072, 16, 224, 512, 12, 512),
        "EVA01-CLIP-g-14": (1408, 40, 16, 6144, 14, 224, 768, 12, 1024),
        "EVA01-CLIP-g-14-plus": (1408, 40, 16, 6144, 14, 224, 1024, 24, 1024),
        "EVA02-CLIP-B-16": (768, 12, 12, 2048, 16, 224, 512, 12, 512),
        "EVA02-CLIP-L-14": (1024, 24, 16, 2730, 14, 224, 768, 12, 768),
        "EVA02-CLIP-L-14-336": (1024, 24, 16, 2730, 14, 336, 768, 12, 768),
        "EVA02-CLIP-bigE-14": (1792, 64, 16, 15360, 14, 224, 1024, 24, 1024),
        "EVA02-CLIP-bigE-14-plus": (1792, 64, 16, 15360, 14, 224, 1280, 32, 1024),
    }
    assert set(OFFICIAL_MODEL_CONFIGS) == set(expected)
    for name, numbers in expected.items():
        config = official_clip_config(name)
        v = config.vision
        assert (v.embed_dim, v.depth, v.num_heads, v.mlp_hidden_dim, v.patch_size, v.img_size[0],
                config.text["width"], config.text["layers"], config.embed_dim) == numbers, name
        assert config.pool == "token" and not config.quick_gelu
        with torch.device("meta"):
            EvaClip(config)
    b16 = official_clip_config("EVA02-CLIP-B-16").vision
    assert b16.use_rope and b16.rope_ref_grid == (16, 16) and b16.grid_size == (14, 14)  # intp_freq
    assert b16.swiglu and b16.sub_ln_attn and b16.sub_ln_mlp
    assert official_clip_config("EVA01-CLIP-B-16").vision.layer_scale_init == 0.1
    assert official_clip_config("EVA02-CLIP-bigE-14").vision.post_norm


@pytest.mark.parametrize("values, message", [
    (dict(vision_cfg=dict(timm_model_name="vit_base"), text_cfg={}), "timm tower"),
    (dict(vision_cfg=dict(layers=2, global_average_pool=True), text_cfg={}), "mean pooling over the cls token"),
    (dict(vision_cfg=dict(layers=2), text_cfg=dict(hf_model_name="xlm-roberta")), "Hugging Face text tower"),
    (dict(vision_cfg=dict(layers=2, relpos=True), text_cfg={}), r"does not translate: \['relpos'\]"),
    ("EVA03-CLIP-Z-99", "neither an official EVA-CLIP model"),
])
def test_official_configs_evamim_cannot_build_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        official_clip_config(values)


# ------------------------------------------------------------------------------------------- evamim clip
def _task_overrides(output, *extra):
    from test_clip_train import tiny_overrides

    # test_clip_model's EVA01 tower (48 wide, 3 heads, 32 px, patch 8) and text tower, a 24-wide joint embedding.
    replaced = ("model.options=", "model.embed_dim=", "model.text=", "data.image_size=")
    base = [o for o in tiny_overrides(output, 2) if not o.startswith(replaced)]
    return base + ["model.options={patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}", "model.embed_dim=24",
                   "model.text={context_length: 12, width: 32, heads: 2, layers: 2}", "data.image_size=32",
                   "model.drop_path_rate=0", *extra]


def test_the_clip_task_starts_from_an_official_checkpoint_whole_or_per_tower(tmp_path):
    import json

    from evamim.cli import main
    from evamim.config import ConfigError, load_config
    from evamim.tasks.clip import ClipTrainConfig, clip_config, initialise, validate

    config = load_config(ClipTrainConfig, None, _task_overrides(tmp_path / "run"))
    source = randomize(EvaClip(clip_config(config)))
    with torch.no_grad():
        source.logit_scale.fill_(3.3)
    torch.save(official_state_dict(source), tmp_path / "official.pt")
    plain_clip = official_state_dict(source, "clip")
    torch.save(plain_clip, tmp_path / "openai_layout.pt")

    # model.clip_pretrained: every tensor, both projections, the logit scale.
    official = f"model.clip_pretrained={tmp_path / 'official.pt'}"
    whole = load_config(ClipTrainConfig, None, _task_overrides(tmp_path / "run", official))
    model = EvaClip(clip_config(whole))
    assert "whole CLIP from" in initialise(model, whole.model)[0]
    assert_same_embeddings(model.eval(), source, model.config)

    # model.pretrained + model.text_pretrained: EVA-CLIP's --pretrained-image / --pretrained-text with its skip-list.
    towers = load_config(ClipTrainConfig, None, _task_overrides(
        tmp_path / "run", f"model.pretrained={tmp_path / 'official.pt'}",
        f"model.text_pretrained={tmp_path / 'openai_layout.pt'}"))
    model = EvaClip(clip_config(towers))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    lines = initialise(model, towers.model)
    assert lines[0].startswith("vision tower:") and "text tower from" in lines[1]
    state = model.state_dict()
    for key, value in source.state_dict().items():
        if key in ("text.text_projection", "logit_scale"):
            assert torch.equal(state[key], fresh[key]), key  # kept at initialisation
        else:
            assert torch.equal(state[key], value), key

    # EVA-01's file (eva_clip_psz14.pt) keeps text.logit_scale in the text tower: it is not a text tensor.
    from evamim.clip import load_open_clip_text

    eva01 = EvaClip(clip_config(config))
    assert "logit_scale" in load_open_clip_text(eva01, official_state_dict(source, "eva01"))
    assert eva01.logit_scale.item() == pytest.approx(3.3)

    with pytest.raises(ConfigError, match="model.clip_pretrained sets every tensor of both towers"):
        validate(load_config(ClipTrainConfig, None, _task_overrides(
            tmp_path / "run", f"model.clip_pretrained={tmp_path / 'official.pt'}",
            f"model.pretrained={tmp_path / 'official.pt'}")))
    with pytest.raises(ConfigError, match="model.text_pretrained /nowhere.pt does not exist"):
        validate(load_config(ClipTrainConfig, None,
                             _task_overrides(tmp_path / "run", "model.text_pretrained=/nowhere.pt")))

    # A run from the official file: loaded, trained two steps, exported; a file that does not fit stops it in one line.
    output = tmp_path / "run"
    assert main(["clip", *_task_overrides(output, f"model.clip_pretrained={tmp_path / 'official.pt'}")]) == 0
    assert json.loads((output / "summary.json").read_text())["clip_init"] == str(tmp_path / "official.pt")
    del plain_clip["ln_final.weight"]
    torch.save(plain_clip, tmp_path / "broken.pt")
    broken = f"model.clip_pretrained={tmp_path / 'broken.pt'}"
    assert main(["clip", *_task_overrides(tmp_path / "broken_run", broken)]) == 2
