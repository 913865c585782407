"""Weights in and out: official EVA-01 files, timm, open_clip / EVA-CLIP towers, EVA-02 names, evamim dirs."""

import os
import pickle

import pytest
import torch

import evamim
from evamim.models.checkpoint import UnsafeCheckpointError, infer_config, load_weights, read_config
from evamim.models.vit import EvaViT, EvaViTConfig

TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=28, patch_size=14, init_std=0.05)


def _random_model(seed=0, **options) -> EvaViT:
    torch.manual_seed(seed)
    model = EvaViT(EvaViTConfig(**{**TINY, **options})).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)  # non-zero biases, non-unit norms
    return model


def official_eva01_mim_state_dict(model: EvaViT) -> dict:
    """The key layout of the official eva_psz14.pt, spelled out by hand from REFERENCE section 8, in fp16."""
    sd = {
        "cls_token": model.cls_token,
        "mask_token": model.mask_token,
        "pos_embed": model.pos_embed,
        "patch_embed.proj.weight": model.patch_embed.proj.weight,
        "patch_embed.proj.bias": model.patch_embed.proj.bias,
        "norm.weight": model.norm.weight,
        "norm.bias": model.norm.bias,
        "lm_head.weight": model.lm_head.weight,
        "lm_head.bias": model.lm_head.bias,
    }
    for i, block in enumerate(model.blocks):
        sd.update({
            f"blocks.{i}.norm1.weight": block.norm1.weight, f"blocks.{i}.norm1.bias": block.norm1.bias,
            f"blocks.{i}.attn.qkv.weight": block.attn.qkv.weight,
            f"blocks.{i}.attn.q_bias": block.attn.q_bias, f"blocks.{i}.attn.v_bias": block.attn.v_bias,
            f"blocks.{i}.attn.proj.weight": block.attn.proj.weight, f"blocks.{i}.attn.proj.bias": block.attn.proj.bias,
            f"blocks.{i}.norm2.weight": block.norm2.weight, f"blocks.{i}.norm2.bias": block.norm2.bias,
            f"blocks.{i}.mlp.fc1.weight": block.mlp.fc1.weight, f"blocks.{i}.mlp.fc1.bias": block.mlp.fc1.bias,
            f"blocks.{i}.mlp.fc2.weight": block.mlp.fc2.weight, f"blocks.{i}.mlp.fc2.bias": block.mlp.fc2.bias,
        })
    return {k: v.detach().clone().half() for k, v in sd.items()}


def _mim_model(seed=0):
    return _random_model(seed, use_mask_token=True, mim_head_dim=24, global_pool="token")


def test_official_eva01_mim_checkpoint_loads_and_matches(tmp_path):
    source = _mim_model()
    path = tmp_path / "eva_psz14.pt"
    torch.save({"model": official_eva01_mim_state_dict(source), "epoch": 149}, path)
    # fp16 storage: compare against the source rounded through fp16.
    source.load_state_dict({k: v.float() for k, v in official_eva01_mim_state_dict(source).items()}, strict=False)
    target = EvaViT(EvaViTConfig(**TINY, use_mask_token=True, mim_head_dim=24, global_pool="token")).eval()
    report = load_weights(target, path, strict=True)
    assert report.ok and report.container_key == "model"
    assert target.blocks[0].attn.qkv.weight.dtype == torch.float32
    images = torch.randn(2, 3, 28, 28)
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    with torch.no_grad():
        torch.testing.assert_close(target.forward_features(images, mask), source.forward_features(images, mask))
        torch.testing.assert_close(target.lm_head(target.forward_features(images)),
                                   source.lm_head(source.forward_features(images)))


def test_mim_checkpoint_into_finetune_model_reports_exact_keys(tmp_path):
    """MIM weights into an avg-pool classifier: norm -> fc_norm (as timm does), MIM-only keys reported, head missing."""
    state = official_eva01_mim_state_dict(_mim_model())
    target = EvaViT(EvaViTConfig(**TINY, num_classes=5))
    report = load_weights(target, {"module": state})
    assert report.renamed == {"norm": "fc_norm"}
    assert sorted(report.unexpected) == ["lm_head.bias", "lm_head.weight", "mask_token"]
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    torch.testing.assert_close(target.fc_norm.weight, state["norm.weight"].float())
    with pytest.raises(ValueError, match="strict=True"):
        load_weights(target, {"model": state}, strict=True)


def test_finetuned_container_prefers_ema_and_reports_head_mismatch():
    source = _random_model(1, num_classes=10)
    ema = _random_model(2, num_classes=10)
    target = EvaViT(EvaViTConfig(**TINY, num_classes=10))
    report = load_weights(target, {"model": source.state_dict(), "model_ema": ema.state_dict()})
    assert report.container_key == "model_ema"
    torch.testing.assert_close(target.head.weight, ema.head.weight)
    report = load_weights(target, {"model": source.state_dict(), "model_ema": ema.state_dict()}, prefer_ema=False)
    assert report.container_key == "model"
    other = EvaViT(EvaViTConfig(**TINY, num_classes=3))
    report = load_weights(other, source.state_dict())
    assert [m[0] for m in report.mismatched] == ["head.weight", "head.bias"]
    assert report.missing == [] and not report.ok  # mismatched keys are reported once, under mismatched


@pytest.mark.parametrize("prefix", ["visual.trunk.", "visual."], ids=["open_clip", "eva_clip"])
def test_clip_vision_towers_load(prefix):
    source = _random_model(3)
    state = {prefix + k: v for k, v in evamim.to_timm_state_dict(source).items()}
    state.update({"text.token_embedding.weight": torch.randn(10, 8), "logit_scale": torch.tensor(1.0)})
    if prefix == "visual.trunk.":
        state["visual.head.proj.weight"] = torch.randn(16, 32)
    target = EvaViT(EvaViTConfig(**TINY))
    report = load_weights(target, {"state_dict": state})
    assert report.missing == []
    images = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(target(images), source(images))


def test_official_eva02_names_load():
    """EVA-02 names: w1 (gate) / w2 (value) / w3, ffn_ln, inner_attn_ln, separate q/k/v, rope buffers."""
    options = dict(use_rope=True, swiglu=True, mlp_ratio=8 / 3, sub_ln_mlp=True, sub_ln_attn=True)
    source = _random_model(4, **options)
    state = {}
    for key, value in source.state_dict().items():
        if ".mlp.fc1." in key:
            gate, val = value.chunk(2)
            state[key.replace("mlp.fc1.", "mlp.w1.")] = gate
            state[key.replace("mlp.fc1.", "mlp.w2.")] = val
        elif ".attn.qkv.weight" in key:
            for name, part in zip("qkv", value.chunk(3)):
                state[key.replace("qkv.weight", f"{name}_proj.weight")] = part
        else:
            state[key.replace("mlp.fc2.", "mlp.w3.").replace("mlp.norm.", "mlp.ffn_ln.")
                  .replace("attn.norm.", "attn.inner_attn_ln.")] = value
    state["rope.freqs_cos"] = torch.randn(4, 16)
    target = EvaViT(EvaViTConfig(**TINY, **options))
    report = load_weights(target, {"module": state}, strict=True)
    assert report.source_format == "official EVA-02"
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(target(images), source(images))


def test_resolution_and_patch_size_are_resampled_on_load():
    source = _random_model(5)
    bigger = EvaViT(EvaViTConfig(**{**TINY, "img_size": 56}))
    report = load_weights(bigger, source.state_dict())
    assert report.ok and report.resampled == ["pos_embed 4 -> 16 patches"]
    patch16 = EvaViT(EvaViTConfig(**{**TINY, "img_size": 32, "patch_size": 16}))
    report = load_weights(patch16, source.state_dict())
    assert any(r.startswith("patch_embed.proj.weight (14, 14) -> (16, 16)") for r in report.resampled)
    # FlexiViT resampling: a patch upsampled 14 -> 16 px through the new kernel gives the old kernel's response.
    patch = torch.randn(1, 3, 14, 14)
    upsampled = torch.nn.functional.interpolate(patch, size=(16, 16), mode="bicubic", align_corners=False)
    old = torch.nn.functional.conv2d(patch, source.patch_embed.proj.weight)
    new = torch.nn.functional.conv2d(upsampled, patch16.patch_embed.proj.weight)
    assert torch.nn.functional.cosine_similarity(old.flatten(), new.flatten(), dim=0) > 0.95


def test_save_pretrained_roundtrip_rebuilds_from_directory(tmp_path):
    source = _random_model(6, use_rope=True, num_classes=3)
    directory = evamim.save_pretrained(source, tmp_path / "model")
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]
    rebuilt = evamim.create_model(pretrained=directory).eval()
    assert rebuilt.config == source.config
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), source(images))
    assert read_config(directory / "model.safetensors") == source.config  # config travels in the metadata too
    reloaded = evamim.create_model(pretrained=directory, num_classes=7)  # override the head
    assert reloaded.head.out_features == 7


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": {"cls_token": torch.zeros(1, 1, 32)}, "payload": _Exploit()}, f)
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Exploit()}, tmp_path / "evil_zip.pt")
    model = EvaViT(EvaViTConfig(**TINY))
    for bad in (path, tmp_path / "evil_zip.pt"):
        with pytest.raises(UnsafeCheckpointError, match="refused to load .*would run code"):
            load_weights(model, bad)
    assert not (tmp_path / "pwned").exists()


def test_training_args_namespace_is_allowed(tmp_path):
    import argparse

    source = _random_model(7)
    torch.save({"model": source.state_dict(), "args": argparse.Namespace(lr=1e-3, model="eva_g")}, tmp_path / "c.pt")
    assert load_weights(EvaViT(EvaViTConfig(**TINY)), tmp_path / "c.pt").ok


def test_missing_and_corrupt_files_have_clear_errors(tmp_path):
    model = EvaViT(EvaViTConfig(**TINY))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_weights(model, tmp_path / "nope.pt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_weights(model, tmp_path / "empty_dir")
    torch.save({"model": model.state_dict()}, tmp_path / "t.pt")
    data = (tmp_path / "t.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_weights(model, tmp_path / "t.pt")


def test_infer_config_from_official_layout():
    state = official_eva01_mim_state_dict(_mim_model())
    config = infer_config({"model": state}["model"], num_heads=2)
    assert (config.embed_dim, config.depth, config.patch_size, config.img_size) == (32, 2, 14, (28, 28))
    assert config.use_mask_token and config.mim_head_dim == 24 and config.global_pool == "token"
    giant_like = {"cls_token": torch.zeros(1, 1, 1408), "patch_embed.proj.weight": torch.zeros(1408, 3, 14, 14),
                  "pos_embed": torch.zeros(1, 257, 1408), "blocks.39.norm1.weight": torch.zeros(1408),
                  "blocks.0.mlp.fc1.weight": torch.zeros(6144, 1408), "blocks.0.mlp.fc2.weight": torch.zeros(1408, 6144)}
    config = infer_config(giant_like)
    assert (config.num_heads, config.depth, config.mlp_hidden_dim) == (16, 40, 6144)


def test_convert_cli_official_file_to_evamim_dir(tmp_path, capsys):
    from evamim.cli import main

    source = _mim_model(8)
    torch.save({"model": official_eva01_mim_state_dict(source)}, tmp_path / "eva.pt")
    assert main(["convert", str(tmp_path / "eva.pt"), str(tmp_path / "out"), "--num-heads", "2",
                 "--set", "img_size=56"]) == 0
    printed = capsys.readouterr().out
    assert "resampled: pos_embed 4 -> 16 patches" in printed
    converted = evamim.create_model(pretrained=tmp_path / "out")
    assert converted.config.img_size == (56, 56) and converted.lm_head.out_features == 24
    torch.testing.assert_close(converted.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight.half().float())
