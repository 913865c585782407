"""Teachers built from tiny, randomly initialised CLIP towers saved to disk and loaded through the spec strings.

Each target is checked against a hand computation that runs the tower's blocks one by one.
"""

import json

import pytest
import torch
import torch.nn.functional as F

import evamim
from evamim.teachers import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    GridMismatchError,
    TeacherWeightsNotFoundError,
    create_teacher,
)

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

TINY_TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
TINY_VIT = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
            "text_cfg": TINY_TEXT}
TINY_EVA_CLIP = {"embed_dim": 32, "custom_text": True, "text_cfg": TINY_TEXT,
                 "vision_cfg": {"image_size": 32, "timm_model_name": "evamim_test_eva02_tiny",
                                "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None}}


def _register_tiny_eva() -> None:
    """A 2-block EVA-02-style timm model (RoPE, SwiGLU) on 32 px, patch 8: the trunk of a tiny EVA-CLIP tower."""
    from timm.models import register_model
    from timm.models._builder import build_model_with_cfg
    from timm.models.eva import Eva

    if timm.is_model("evamim_test_eva02_tiny"):
        return

    @register_model
    def evamim_test_eva02_tiny(pretrained=False, **kwargs):
        args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4 * 2 / 3,
                    swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4))
        return build_model_with_cfg(Eva, "evamim_test_eva02_tiny", pretrained, **dict(args, **kwargs))


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (unit norms and zero biases would hide a skipped layer)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """Tiny open_clip models (OpenAI-style ViT and EVA-CLIP-style timm trunk) registered and saved to disk."""
    _register_tiny_eva()
    root = tmp_path_factory.mktemp("open_clip")
    models = {}
    quick_gelu_vit = dict(TINY_VIT, quick_gelu=True)
    for name, config in (("evamim-test-vit", TINY_VIT), ("evamim-test-eva-clip", TINY_EVA_CLIP),
                         ("evamim-test-vit-quickgelu", quick_gelu_vit)):
        config_file = root / f"{name}.json"
        config_file.write_text(json.dumps(config))
        open_clip.add_model_config(config_file)
        torch.manual_seed(0)
        model = open_clip.create_model(name)
        _randomize(model)
        weights = root / f"{name}.pt"
        torch.save(model.state_dict(), weights)
        models[name] = (model.visual.eval(), str(weights))
    return models


def _images(batch=2, size=32, seed=0):
    """Raw RGB in [0, 1] and the same images CLIP-normalised (what the student gets)."""
    raw = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return raw, (raw - mean) / std


@torch.no_grad()
def _open_clip_by_hand(visual, images, pos_embed=None, blocks=None, project=True):
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + (visual.positional_embedding if pos_embed is None else pos_embed)
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks[:blocks]:
        x = block(x)
    tokens = visual.ln_post(x[:, 1:])
    return tokens @ visual.proj if project else tokens


# ------------------------------------------------------------------------------------------- open_clip
def test_open_clip_targets_are_projected_ln_post_tokens(clip_files):
    visual, weights = clip_files["evamim-test-vit"]
    teacher = create_teacher(f"open_clip:evamim-test-vit/{weights}")
    _, images = _images()
    targets = teacher(images)
    assert targets.shape == (2, 16, 32) and targets.dtype == torch.float32
    assert teacher.embed_dim == 32 and teacher.patch_size == 8 and teacher.image_size == (32, 32)
    assert teacher.mean == CLIP_MEAN and teacher.std == CLIP_STD
    torch.testing.assert_close(targets, _open_clip_by_hand(visual, images), rtol=1e-5, atol=1e-5)


def test_open_clip_local_dir(clip_files, tmp_path):
    visual, weights = clip_files["evamim-test-vit"]
    config = {"model_cfg": TINY_VIT, "preprocess_cfg": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(open(weights, "rb").read())
    teacher = create_teacher(f"open_clip:local-dir:{tmp_path}", student_mean=IMAGENET_MEAN, student_std=IMAGENET_STD)
    assert teacher.mean == IMAGENET_MEAN
    _, images = _images()
    torch.testing.assert_close(teacher(images), _open_clip_by_hand(visual, images), rtol=1e-5, atol=1e-5)


def test_open_clip_unprojected_and_intermediate_layer(clip_files):
    visual, weights = clip_files["evamim-test-vit"]
    _, images = _images()
    unprojected = create_teacher(f"open_clip:evamim-test-vit/{weights}", project=False)
    assert unprojected.embed_dim == 64
    torch.testing.assert_close(unprojected(images), _open_clip_by_hand(visual, images, project=False), rtol=1e-5, atol=1e-5)
    first_block = create_teacher(f"open_clip:evamim-test-vit/{weights}", layer=0)
    torch.testing.assert_close(first_block(images), _open_clip_by_hand(visual, images, blocks=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        create_teacher(f"open_clip:evamim-test-vit/{weights}", layer=2)


def test_teacher_is_frozen(clip_files):
    _, weights = clip_files["evamim-test-vit"]
    teacher = create_teacher(f"open_clip:evamim-test-vit/{weights}")
    assert not any(parameter.requires_grad for parameter in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(module.training for module in teacher.modules())
    _, images = _images()
    images.requires_grad_(True)
    targets = teacher(images)
    assert not targets.requires_grad and targets.grad_fn is None
    assert not targets.is_inference()


def test_open_clip_eva_clip_timm_trunk(clip_files):
    visual, weights = clip_files["evamim-test-eva-clip"]
    teacher = create_teacher(f"open_clip:evamim-test-eva-clip/{weights}")
    _, images = _images()
    trunk = visual.trunk
    with torch.no_grad():
        by_hand = trunk.head(trunk.forward_features(images)[:, trunk.num_prefix_tokens:])
    assert teacher.embed_dim == 32
    torch.testing.assert_close(teacher(images), by_hand, rtol=1e-5, atol=1e-5)
    unprojected = create_teacher(f"open_clip:evamim-test-eva-clip/{weights}", project=False)
    assert unprojected(images).shape == (2, 16, 64)
    # RoPE and pos-embed follow the trunk to another grid.
    resized = create_teacher(f"open_clip:evamim-test-eva-clip/{weights}", student_grid=(3, 5))
    assert resized(torch.randn(2, 3, 48, 80)).shape == (2, 15, 32)


def test_gelu_architectures_with_quickgelu_weights_are_refused():
    with pytest.raises(ValueError, match="ViT-B-32-quickgelu/openai"):
        create_teacher("open_clip:ViT-B-32/openai")
    with pytest.raises(ValueError, match="vit_base_patch16_clip_quickgelu_224.openai"):
        create_teacher("timm:vit_base_patch16_clip_224.openai")


def test_missing_weights_offline_error_is_clear(monkeypatch, tmp_path):
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    cases = {
        "open_clip:ViT-B-32-quickgelu/openai": "vit_base_patch32_clip_224.openai",
        "timm:vit_tiny_patch16_224.augreg_in21k": "vit_tiny_patch16_224.augreg_in21k",
        "hf:openai/clip-vit-base-patch32": "openai/clip-vit-base-patch32",
    }
    for spec, looked_for in cases.items():
        with pytest.raises(TeacherWeightsNotFoundError) as caught:
            create_teacher(spec, cache_dir=str(tmp_path))
        message = str(caught.value)
        assert spec in message and looked_for in message and str(tmp_path) in message
        assert "HF_HUB_OFFLINE" in message and "local:" in message and "HF_HOME" in message


def test_missing_weights_file_error_is_clear(clip_files, tmp_path):
    missing = tmp_path / "nope.pt"
    for spec in (f"open_clip:evamim-test-vit/{missing}", f"timm:vit_tiny_patch16_224/{missing}",
                 f"hf:{tmp_path}/no_such_dir/x", f"local:{tmp_path}/no_such_dir"):
        with pytest.raises(TeacherWeightsNotFoundError, match="does not exist") as caught:
            create_teacher(spec)
        assert spec in str(caught.value)


def test_bad_specs_and_options(clip_files):
    with pytest.raises(ValueError, match="BACKEND:TARGET"):
        create_teacher("clip:ViT-L-14")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        create_teacher("open_clip:ViT-L-15/openai")
    with pytest.raises(ValueError, match="needs weights"):
        create_teacher("open_clip:evamim-test-vit")
    _, weights = clip_files["evamim-test-vit"]
    with pytest.raises(TypeError, match="unknown option"):
        create_teacher(f"open_clip:evamim-test-vit/{weights}", projct=False)


# --------------------------------------------------------------------------------- input handling
def test_normalisation_conversion_is_exact(clip_files):
    _, weights = clip_files["evamim-test-vit"]
    teacher = create_teacher(f"open_clip:evamim-test-vit/{weights}", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    raw, clip_normalised = _images(batch=3)
    direct = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(teacher.prepare(clip_normalised), direct, rtol=0, atol=2e-6)
    same = create_teacher(f"open_clip:evamim-test-vit/{weights}")
    assert torch.equal(same.prepare(clip_normalised), clip_normalised)


def test_grid_alignment_resizes_to_the_student_grid(clip_files):
    visual, weights = clip_files["evamim-test-vit"]
    # Student: 16-px patches at 64 px = 4x4. Teacher: 8-px patches, native 32 px = 4x4 -> images go to 32 px.
    teacher = create_teacher(f"open_clip:evamim-test-vit/{weights}", student_grid=(4, 4))
    _, images = _images(size=64)
    targets = teacher(images)
    assert targets.shape == (2, 16, 32) and teacher.image_size == (32, 32)
    resized = F.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(targets, _open_clip_by_hand(visual, resized), rtol=1e-5, atol=1e-5)


def test_grid_alignment_resamples_position_embeddings(clip_files):
    from timm.layers import resample_abs_pos_embed

    visual, weights = clip_files["evamim-test-vit"]
    # Student grid 5x5 (e.g. 16-px patches at 80 px): the teacher runs at 40 px with a 5x5 pos-embed.
    teacher = create_teacher(f"open_clip:evamim-test-vit/{weights}", student_grid=5)
    assert teacher.image_size == (40, 40) and teacher.native_grid == (4, 4)
    _, images = _images(size=80)
    resized = F.interpolate(images, size=(40, 40), mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
        pos_embed = resample_abs_pos_embed(visual.positional_embedding[None], new_size=[5, 5], old_size=[4, 4])[0]
    torch.testing.assert_close(teacher(images), _open_clip_by_hand(visual, resized, pos_embed=pos_embed),
                               rtol=1e-5, atol=1e-5)


def test_unalignable_grids_are_refused(clip_files, monkeypatch):
    _, weights = clip_files["evamim-test-vit"]
    teacher = create_teacher(f"open_clip:evamim-test-vit/{weights}", student_grid=(4, 4))
    with pytest.raises(GridMismatchError, match=r"4x4.*4x4.*60x64"):
        teacher(torch.randn(1, 3, 60, 64))
    # A teacher that can only run at its native grid.
    from timm.models.vision_transformer import VisionTransformer

    monkeypatch.delattr(VisionTransformer, "set_input_size")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    path = weights.replace(".pt", "-vit.pt")
    torch.save(model.state_dict(), path)
    with pytest.raises(GridMismatchError, match=r"native grid 4x4.*student's grid 6x6"):
        create_teacher(f"timm:vit_tiny_patch16_224/{path}", student_grid=6,
                       model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2))


def test_dtype_autocast_and_device(clip_files):
    _, weights = clip_files["evamim-test-vit"]
    _, images = _images()
    reference = create_teacher(f"open_clip:evamim-test-vit/{weights}", dtype="fp32")
    bf16 = create_teacher(f"open_clip:evamim-test-vit/{weights}", dtype=torch.bfloat16, device="cpu")
    low = bf16(images)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, reference(images), rtol=0.1, atol=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert reference(images).dtype == torch.float32
        torch.testing.assert_close(reference(images), reference.to("cpu")(images.float()))


# ------------------------------------------------------------------------------------ transformers
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
    torch.manual_seed(0)
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    _randomize(model, seed=1)
    directory = tmp_path_factory.mktemp("hf") / "tiny-clip"
    model.save_pretrained(directory)
    return model, directory


def test_hf_targets_are_projected_post_layernorm_tokens(hf_dir):
    model, directory = hf_dir
    teacher = create_teacher(f"hf:{directory}")
    _, images = _images()
    with torch.no_grad():
        vision = model.vision_model
        x = vision.embeddings(images)
        x = vision.pre_layrnorm(x)
        for layer in vision.encoder.layers:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
        by_hand = model.visual_projection(vision.post_layernorm(x[:, 1:]))
        last_hidden_state = model(pixel_values=images).last_hidden_state
        library = model.visual_projection(vision.post_layernorm(last_hidden_state[:, 1:]))
    targets = teacher(images)
    assert targets.shape == (2, 16, 32) and teacher.embed_dim == 32
    torch.testing.assert_close(targets, by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(targets, library, rtol=1e-5, atol=1e-5)
    unprojected = create_teacher(f"hf:{directory}", project=False)
    torch.testing.assert_close(unprojected(images), vision.post_layernorm(last_hidden_state[:, 1:]), rtol=1e-5, atol=1e-5)
    assert create_teacher(f"hf:{directory}", student_grid=(3, 5))(torch.randn(1, 3, 48, 80)).shape == (1, 15, 32)
    with torch.no_grad():
        hidden = model(pixel_values=images, output_hidden_states=True).hidden_states[1]  # after layer 0
        first_layer = model.visual_projection(vision.post_layernorm(hidden[:, 1:]))
    torch.testing.assert_close(create_teacher(f"hf:{directory}", layer=0)(images), first_layer, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------- timm
def test_timm_targets_are_normed_patch_tokens(tmp_path):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=24, reg_tokens=2)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    _randomize(model)
    path = tmp_path / "vit.pt"
    torch.save(model.state_dict(), path)
    spec = f"timm:vit_tiny_patch16_224/{path}"
    _, images = _images()
    with torch.no_grad():
        x = model.patch_embed(images)
        x = model._pos_embed(x)
        x = model.norm_pre(x)
        for block in model.blocks:
            x = block(x)
        tokens = model.norm(x)[:, 3:]  # cls + 2 registers dropped
    teacher = create_teacher(spec, model_kwargs=kwargs, student_mean=teacher_mean(model), student_std=teacher_std(model))
    assert teacher.embed_dim == 32
    torch.testing.assert_close(teacher(images), tokens, rtol=1e-5, atol=1e-5)
    projected = create_teacher(spec, model_kwargs=kwargs, project=True,
                               student_mean=teacher_mean(model), student_std=teacher_std(model))
    assert projected.embed_dim == 24
    torch.testing.assert_close(projected(images), model.head(tokens), rtol=1e-5, atol=1e-5)
    # The default normalisation comes from the model's pretrained config (0.5 / 0.5 for this one).
    assert create_teacher(spec, model_kwargs=kwargs).mean == tuple(model.pretrained_cfg["mean"])


def test_timm_clip_model_with_projection_matches_open_clip(clip_files):
    # timm reads open_clip checkpoints of its CLIP architectures; with project=True both give the same targets.
    _, weights = clip_files["evamim-test-vit-quickgelu"]
    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=32)
    via_timm = create_teacher(f"timm:vit_base_patch16_clip_quickgelu_224.openai/{weights}", project=True,
                              model_kwargs=kwargs)
    via_open_clip = create_teacher(f"open_clip:evamim-test-vit-quickgelu/{weights}")
    _, images = _images()
    assert via_timm.mean == via_open_clip.mean == CLIP_MEAN
    torch.testing.assert_close(via_timm(images), via_open_clip(images), rtol=1e-5, atol=1e-5)


def teacher_mean(model):
    return tuple(model.pretrained_cfg["mean"])


def teacher_std(model):
    return tuple(model.pretrained_cfg["std"])


# ------------------------------------------------------------------------------------------- local
def test_local_teacher_from_an_evamim_directory(tmp_path):
    checkpoint = pytest.importorskip("evamim.models.checkpoint")
    if not hasattr(checkpoint, "load_pretrained"):
        pytest.skip("evamim.models.checkpoint.load_pretrained is not available")
    model = evamim.create_model("eva_tiny_p16", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                global_pool="token").eval()
    _randomize(model)
    checkpoint.save_pretrained(model, tmp_path / "eva")
    teacher = create_teacher(f"local:{tmp_path / 'eva'}")
    _, images = _images()
    with torch.no_grad():
        tokens = model.forward_features(images)[:, 1:]
    assert teacher.embed_dim == 48
    torch.testing.assert_close(teacher(images), tokens, rtol=1e-5, atol=1e-5)
    assert create_teacher(f"local:{tmp_path / 'eva'}", student_grid=(3, 3))(torch.randn(2, 3, 48, 48)).shape == (2, 9, 48)


def test_random_tag_builds_the_architecture_without_weights(clip_files):
    from evamim.teachers import create_teacher

    teacher = create_teacher("open_clip:evamim-test-vit/random", dtype="fp32")
    targets = teacher(torch.randn(2, 3, 32, 32))
    assert targets.shape[0] == 2 and targets.shape[-1] == teacher.embed_dim
    assert not any(p.requires_grad for p in teacher.parameters())


# ------------------------------------------------------------------------------- checks before building
def _no_weights_or_models(monkeypatch):
    """Downloading or loading weights, or building a real teacher, fails the test."""
    def fail(*args, **kwargs):
        raise AssertionError("weights were looked up or a model was built before the refusal")

    import evamim.teachers.open_clip as open_clip_backend
    import evamim.teachers.timm as timm_backend

    monkeypatch.setattr(timm_backend, "_weights_file", fail)
    monkeypatch.setattr(open_clip_backend, "_tag_file", fail)
    monkeypatch.setattr("evamim.teachers.factory._build_encoder", fail)


@pytest.mark.parametrize("spec, options, error, message", [
    ("timm:resnet50", {}, ValueError, "not a ViT-family timm model"),
    ("timm:vit_base_patch16_224x", {}, ValueError, "close matches: .*'vit_base_patch16_224'"),
    ("timm:vit_base_patch16_224.augreg_in21k", {"layer": 12}, ValueError, "layer=12 is out of range"),
    ("timm:vit_base_patch16_224.augreg_in21k", {"model_kwargs": {"img_sz": 32}}, ValueError, "img_sz"),
    ("timm:vit_base_patch16_224/nowhere.safetensors", {}, TeacherWeightsNotFoundError, "nowhere.safetensors"),
    ("open_clip:ViT-L-14-quickgel/openai", {}, ValueError, "close matches: .*'ViT-L-14-quickgelu'"),
    ("open_clip:RN50-quickgelu/openai", {}, ValueError, "ModifiedResNet.*is not a ViT"),
    ("open_clip:coca_ViT-L-14/laion2b_s13b_b90k", {}, ValueError, "pools its tokens with attention"),
    ("open_clip:ViT-L-14-quickgelu/openai", {"layer": 24}, ValueError, "layer=24 is out of range"),
    ("open_clip:ViT-L-14-quickgelu/openai", {"projct": False}, TypeError, r"\['projct'\] \(did you mean 'project'\?\)"),
    ("open_clip:ViT-L-14-quickgelu/nowhere/weights.bin", {}, TeacherWeightsNotFoundError, "nowhere/weights.bin"),
    ("hf:/nowhere/clip", {}, TeacherWeightsNotFoundError, "/nowhere/clip"),
])
def test_teachers_are_refused_without_weights_or_building(spec, options, error, message, monkeypatch):
    from evamim.teachers import check_teacher

    _no_weights_or_models(monkeypatch)
    with pytest.raises(error, match=message):
        check_teacher(spec, options)
    with pytest.raises(error, match=message):  # create_teacher checks first, too
        create_teacher(spec, **options)


def test_check_teacher_accepts_what_create_teacher_builds(clip_files, tmp_path, monkeypatch):
    from evamim.teachers import check_teacher

    _, weights = clip_files["evamim-test-vit"]
    check_teacher(f"open_clip:evamim-test-vit/{weights}", {"layer": 1, "project": False, "mean": [0.5] * 3})
    check_teacher("open_clip:ViT-L-14-quickgelu/openai", {"layer": -1})
    check_teacher("timm:vit_large_patch14_clip_quickgelu_224.openai", {"project": True})
    model = evamim.create_model("eva_tiny_p16", patch_size=8, img_size=32, embed_dim=32, depth=2, num_heads=2)
    directory = evamim.save_pretrained(model, tmp_path / "teacher")
    check_teacher(f"local:{directory}", {"layer": 1})
    with pytest.raises(ValueError, match="layer=2 is out of range"):
        check_teacher(f"local:{directory}", {"layer": 2})
