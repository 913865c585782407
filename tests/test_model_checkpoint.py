"""Weights in and out: official EVA-01 files, timm, open_clip / EVA-CLIP towers, EVA-02 names, evamim dirs."""

import os
import pickle

import pytest
import torch

import evamim
from evamim.models.checkpoint import (
    CorruptCheckpointError,
    NonFiniteWeightsError,
    UnsafeCheckpointError,
    WeightsMismatchError,
    infer_architecture,
    infer_config,
    load_weights,
    read_config,
)
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


def test_mim_checkpoint_into_finetune_model_is_strict_on_the_backbone_only():
    """MIM weights into an avg-pool classifier: norm -> fc_norm (as timm does); the MIM-only tensors are task
    heads the model does not have (dropped) and the new classifier starts fresh, both under strict=True."""
    state = official_eva01_mim_state_dict(_mim_model())
    target = EvaViT(EvaViTConfig(**TINY, num_classes=5))
    report = load_weights(target, {"module": state})  # strict by default
    assert report.ok and report.renamed == {"norm": "fc_norm"}
    assert sorted(report.dropped) == ["lm_head.bias", "lm_head.weight", "mask_token"]
    assert sorted(report.fresh) == ["head.bias", "head.weight"]
    assert report.missing == report.unexpected == []
    assert "initialised fresh (task heads): head.weight, head.bias" in str(report)
    assert "dropped (task heads not in this model): " in str(report)
    torch.testing.assert_close(target.fc_norm.weight, state["norm.weight"].float())
    # With no task heads declared, the same load must match everything.
    with pytest.raises(WeightsMismatchError, match=r"weights do not match the model \(strict\)"):
        load_weights(target, {"model": state}, task_heads=())


def test_strict_is_the_default_and_a_wrong_file_leaves_the_model_untouched(tmp_path, caplog):
    """A file of another width: refused by default (create_model and load_weights); non-strict is explicit and
    summarises what stays at init in one line."""
    wrong = _random_model(1, embed_dim=48, num_heads=2)
    torch.save({"model": wrong.state_dict()}, tmp_path / "wrong.pt")
    target = EvaViT(EvaViTConfig(**TINY))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsMismatchError) as raised:
        load_weights(target, tmp_path / "wrong.pt")
    message = str(raised.value)
    assert "\n" not in message and "model tensors left at initialisation" in message and "strict=False" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    with pytest.raises(WeightsMismatchError):
        evamim.create_model("eva_tiny_p16", pretrained=tmp_path / "wrong.pt", **{k: v for k, v in TINY.items()
                                                                                 if k != "init_std"})
    report = load_weights(target, tmp_path / "wrong.pt", strict=False)
    assert not report.ok and len(report.left_at_init) == len(report.mismatched) > 10
    problem_lines = [line for line in str(report).splitlines() if "NOT MATCHED" in line]
    assert len(problem_lines) == 1 and f"{len(report.left_at_init)} of " in problem_lines[0]
    assert " more" in problem_lines[0]  # a few names, not all of them


def test_containers_take_model_by_default_and_say_which_was_taken():
    source = _random_model(1, num_classes=10)
    ema = _random_model(2, num_classes=10)
    target = EvaViT(EvaViTConfig(**TINY, num_classes=10))
    both = {"model": source.state_dict(), "model_ema": ema.state_dict()}
    report = load_weights(target, both)
    assert report.container_key == "model" and report.other_containers == ["model_ema"]
    assert "from 'model'; the file also holds 'model_ema'" in str(report)
    torch.testing.assert_close(target.head.weight, source.head.weight)
    report = load_weights(target, both, prefer_ema=True)
    assert report.container_key == "model_ema" and "EMA weights, as asked" in str(report)
    torch.testing.assert_close(target.head.weight, ema.head.weight)
    timm_style = {"state_dict": source.state_dict(), "state_dict_ema": ema.state_dict()}
    assert load_weights(target, timm_style, prefer_ema=True).container_key == "state_dict_ema"
    assert load_weights(target, timm_style).other_containers == ["state_dict_ema"]
    with pytest.raises(ValueError, match="asked for the EMA weights but the checkpoint has none"):
        load_weights(target, {"model": source.state_dict()}, prefer_ema=True)
    plain = load_weights(target, source.state_dict())
    assert plain.container_key is None and "from a plain state dict" in str(plain)


def test_a_task_head_of_another_shape_starts_fresh_and_is_named():
    source = _random_model(1, num_classes=10)
    other = EvaViT(EvaViTConfig(**TINY, num_classes=3))
    report = load_weights(other, source.state_dict())
    assert report.ok and report.fresh == ["head.weight", "head.bias"]
    assert [key for key, _, _ in report.reshaped_heads] == ["head.weight", "head.bias"]
    assert "the file's head.weight is (10, 32), not (3, 32)" in str(report)
    with pytest.raises(WeightsMismatchError, match="head.weight"):
        load_weights(other, source.state_dict(), task_heads=())


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


def official_eva02_names(state: dict) -> dict:
    """evamim names -> EVA-CLIP / EVA-02 names: w1 (gate) / w2 (value) / w3, ffn_ln, inner_attn_ln, q/k/v_proj
    without bias (the biases stay q_bias / v_bias)."""
    renamed = {}
    for key, value in state.items():
        if ".mlp.fc1." in key:
            gate, val = value.chunk(2)
            renamed[key.replace("mlp.fc1.", "mlp.w1.")], renamed[key.replace("mlp.fc1.", "mlp.w2.")] = gate, val
        elif ".attn.qkv.weight" in key:
            for name, part in zip("qkv", value.chunk(3)):
                renamed[key.replace("qkv.weight", f"{name}_proj.weight")] = part
        else:
            renamed[key.replace("mlp.fc2.", "mlp.w3.").replace("mlp.norm.", "mlp.ffn_ln.")
                    .replace("attn.norm.", "attn.inner_attn_ln.")] = value
    return renamed


def test_official_eva02_names_load():
    """EVA-02 names: w1 (gate) / w2 (value) / w3, ffn_ln, inner_attn_ln, separate q/k/v, rope buffers."""
    options = dict(use_rope=True, swiglu=True, mlp_ratio=8 / 3, sub_ln_mlp=True, sub_ln_attn=True)
    source = _random_model(4, **options)
    state = official_eva02_names(source.state_dict())
    state["rope.freqs_cos"], state["rope.freqs_sin"] = official_rope_tables(16, pt_seq_len=2, ft_seq_len=2)
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
    assert report.ok and report.resampled == ["pos_embed 2x2 -> 4x4 patches"]
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
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        load_weights(model, tmp_path / "t.pt")


@pytest.mark.parametrize("content", [b"\x80\x02" + bytes(range(7, 250)), bytes(range(256)) * 4,
                                     b"not a checkpoint\n", b""], ids=["pickle_header", "bytes", "text", "empty"])
def test_garbage_is_reported_corrupt_not_unsafe(tmp_path, content):
    """Broken bytes are not 'code that would run': they must be reported as not-a-checkpoint."""
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match="not a PyTorch checkpoint or is truncated/corrupt"):
        load_weights(EvaViT(EvaViTConfig(**TINY)), path)


def test_safetensors_are_reported_by_their_keys_and_evamim_only_with_its_config(tmp_path):
    from safetensors.torch import save_file

    source = _random_model(9, swiglu=True, mlp_ratio=8 / 3, sub_ln_mlp=True)
    timm_state = {k: v.contiguous() for k, v in evamim.to_timm_state_dict(source, qkv_fused=False).items()}
    save_file(timm_state, str(tmp_path / "timm.safetensors"))
    target = EvaViT(source.config)
    assert load_weights(target, tmp_path / "timm.safetensors").source_format == "timm Eva"
    evamim.save_pretrained(source, tmp_path / "native")
    report = load_weights(target, tmp_path / "native" / "model.safetensors")
    assert report.source_format == "evamim" and "metadata of model.safetensors" in str(report)


def official_rope_tables(head_dim, pt_seq_len, ft_seq_len, theta=10000.0):
    """The official EVA-02 VisionRotaryEmbeddingFast buffers (freqs_cos, freqs_sin), written out without einops."""
    dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
    freqs = torch.einsum("..., f -> ... f", t, freqs).repeat_interleave(2, -1)  # '... n -> ... (n r)', r=2
    rows = freqs[:, None, :].expand(ft_seq_len, ft_seq_len, dim)
    cols = freqs[None, :, :].expand(ft_seq_len, ft_seq_len, dim)
    freqs = torch.cat((rows, cols), dim=-1)  # broadcat: row angles, then column angles
    return freqs.cos().reshape(-1, head_dim), freqs.sin().reshape(-1, head_dim)


def test_infer_config_from_official_layout():
    state = official_eva01_mim_state_dict(_mim_model())
    config = infer_config({"model": state}["model"], num_heads=2)
    assert (config.embed_dim, config.depth, config.patch_size, config.img_size) == (32, 2, 14, (28, 28))
    assert config.use_mask_token and config.mim_head_dim == 24 and config.global_pool == "token"
    giant_like = {"cls_token": torch.zeros(1, 1, 1408), "patch_embed.proj.weight": torch.zeros(1408, 3, 14, 14),
                  "pos_embed": torch.zeros(1, 257, 1408), "blocks.39.norm1.weight": torch.zeros(1408),
                  "blocks.0.mlp.fc1.weight": torch.zeros(6144, 1408), "blocks.0.mlp.fc2.weight": torch.zeros(1408, 6144)}
    inference = infer_architecture(giant_like)
    assert (inference.config.num_heads, inference.config.depth, inference.config.mlp_hidden_dim) == (16, 40, 6144)
    assert any("num_heads 16: from the preset eva_giant_p14" in note for note in inference.notes)
    assert not inference.config.use_rope and not inference.config.post_norm
    # A config the file carries wins over the preset fallback (heads cannot be read off weights).
    stated = infer_architecture(giant_like, source_config={"num_heads": 11})
    assert stated.config.num_heads == 11 and not any("preset" in note for note in stated.notes)


def test_convert_cli_official_file_to_evamim_dir(tmp_path, capsys):
    from evamim.cli import main

    source = _mim_model(8)
    torch.save({"model": official_eva01_mim_state_dict(source)}, tmp_path / "eva.pt")
    assert main(["convert", str(tmp_path / "eva.pt"), str(tmp_path / "out"), "--num-heads", "2",
                 "--set", "img_size=56"]) == 0
    printed = capsys.readouterr().out
    assert "resampled: pos_embed 2x2 -> 4x4 patches" in printed
    converted = evamim.create_model(pretrained=tmp_path / "out")
    assert converted.config.img_size == (56, 56) and converted.lm_head.out_features == 24
    torch.testing.assert_close(converted.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight.half().float())


def test_a_model_with_non_finite_weights_is_never_saved_as_a_finished_model(tmp_path):
    model = evamim.create_model("eva_tiny_p16", depth=2, embed_dim=64, num_heads=2)
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"1 of \d+ tensors hold NaN or infinite values \(blocks.1.mlp"):
        evamim.save_pretrained(model, tmp_path / "model")
    assert not (tmp_path / "model").exists()
