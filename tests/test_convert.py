"""evamim convert and architecture inference: RoPE read off official tables (or refused), post-norm, the
source's own config, strictness, and the timm / open_clip output formats."""

import json

import pytest
import torch
from test_model_checkpoint import official_eva01_mim_state_dict, official_eva02_names, official_rope_tables

import evamim
from evamim.cli import main
from evamim.models.checkpoint import infer_config, load_weights, read_rope_tables, to_timm_state_dict
from evamim.models.resample import resample_pos_embed, set_input_size
from evamim.models.vit import EvaViT, EvaViTConfig

# No preset is 64 wide and 2 deep: without a config, the head count can only come from RoPE tables.
EVA02_TINY = dict(embed_dim=64, depth=2, num_heads=4, img_size=56, patch_size=14, swiglu=True, mlp_ratio=8 / 3,
                  sub_ln_mlp=True, sub_ln_attn=True, use_rope=True, rope_ref_grid=(16, 16))


def _randomized(config: EvaViTConfig, seed: int = 0) -> EvaViT:
    model = EvaViT(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


def official_eva02_state_dict(model: EvaViT, pt_seq_len: int = 16) -> dict:
    """EVA-CLIP / EVA-02 names: q/k/v_proj without bias + q_bias / v_bias, inner_attn_ln, w1/w2/w3, ffn_ln, and
    one rope module shared by the model and every block (so 1 + depth copies of its tables)."""
    state = official_eva02_names(model.state_dict())
    head_dim = model.config.embed_dim // model.config.num_heads
    cos, sin = official_rope_tables(head_dim, pt_seq_len=pt_seq_len, ft_seq_len=model.grid_size[0])
    for prefix in ["rope."] + [f"blocks.{i}.attn.rope." for i in range(model.config.depth)]:
        state[prefix + "freqs_cos"], state[prefix + "freqs_sin"] = cos, sin
    return {k: v.detach().clone() for k, v in state.items()}


def _outputs(model: EvaViT, size: int) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5)))


# ------------------------------------------------------------------------------------------ RoPE (defect 2)
def test_convert_reads_rope_off_official_eva02_tables(tmp_path, capsys):
    source = _randomized(EvaViTConfig(**EVA02_TINY))
    torch.save({"module": official_eva02_state_dict(source)}, tmp_path / "eva02.pt")
    assert main(["convert", str(tmp_path / "eva02.pt"), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "rope_ref_grid (16, 16), rope_temperature 10000 and 4 heads: read off the file's RoPE tables" in printed
    assert "the file's RoPE tables match the model's" in printed
    converted = evamim.create_model(pretrained=tmp_path / "out").eval()
    config = converted.config
    assert (config.use_rope, config.rope_ref_grid, config.rope_temperature, config.num_heads) == (
        True, (16, 16), 10000.0, 4)
    torch.testing.assert_close(_outputs(converted, 56), _outputs(source, 56))
    set_input_size(converted, 84)  # the reference grid matters at other sizes
    set_input_size(source, 84)
    torch.testing.assert_close(_outputs(converted, 84), _outputs(source, 84))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_read_rope_tables_recovers_grid_and_temperature(dtype):
    cos, sin = official_rope_tables(32, pt_seq_len=12, ft_seq_len=6, theta=100.0)
    read = read_rope_tables(cos.to(dtype), sin.to(dtype))
    assert read == {"head_dim": 32, "grid": (6, 6), "rope_ref_grid": (12, 12), "rope_temperature": 100.0}
    with pytest.raises(ValueError, match="not EVA-02's 2-D RoPE"):
        read_rope_tables(torch.rand(36, 32), torch.rand(36, 32))


def test_rope_tables_are_checked_against_the_model():
    source = _randomized(EvaViTConfig(**EVA02_TINY))
    state = official_eva02_state_dict(source)
    with pytest.raises(ValueError, match="the file holds RoPE tables .* but the model has none"):
        load_weights(EvaViT(EvaViTConfig(**{**EVA02_TINY, "use_rope": False})), state)
    with pytest.raises(ValueError, match="RoPE tables differ from the model's"):
        load_weights(EvaViT(EvaViTConfig(**{**EVA02_TINY, "rope_ref_grid": None})), state)


def test_timm_eva02_weights_without_rope_facts_are_refused(tmp_path, capsys):
    """timm / open_clip files hold no RoPE tables: whether RoPE is on, and its grid, must be given."""
    source = _randomized(EvaViTConfig(**EVA02_TINY))
    torch.save(to_timm_state_dict(source), tmp_path / "timm_eva02.pth")
    command = ["convert", str(tmp_path / "timm_eva02.pth"), str(tmp_path / "out"), "--num-heads", "4"]
    assert main(command) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "cannot tell whether this model uses RoPE" in error
    assert "--set use_rope=true --set rope_ref_grid=[16,16]" in error and not (tmp_path / "out").exists()
    assert main(command + ["--set", "use_rope=true"]) == 2
    assert "rope_ref_grid" in capsys.readouterr().err
    assert main(command + ["--set", "use_rope=true", "--set", "rope_ref_grid=[16,16]"]) == 0
    assert "rope_temperature 10000: not stored in the weights" in capsys.readouterr().out
    converted = evamim.create_model(pretrained=tmp_path / "out").eval()
    torch.testing.assert_close(_outputs(converted, 56), _outputs(source, 56))


# ------------------------------------------------------------------------------------- post-norm (defect 3)
def test_eva02_e_shape_is_refused_unless_post_norm_is_stated():
    """Post-norm blocks have the same tensors as pre-norm ones: the EVA02-E shape must say which it is."""
    width, depth, hidden = 1792, 64, 15360
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, 257, width), "patch_embed.proj.weight": (width, 3, 14, 14),
              "blocks.0.mlp.fc1.weight": (hidden, width), "blocks.0.mlp.fc2.weight": (width, hidden),
              f"blocks.{depth - 1}.norm1.weight": (width,), "blocks.0.attn.q_bias": (width,)}
    state = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    with pytest.raises(ValueError, match=r"shape of EVA02-E.*--set post_norm=true"):
        infer_config(state, num_heads=16)
    assert infer_config(state, num_heads=16, given={"post_norm": True}).post_norm


# ---------------------------------------------------------------------------------- strictness (defect 5)
def test_convert_refuses_a_file_of_another_shape_unless_non_strict(tmp_path, capsys):
    source = _randomized(EvaViTConfig(embed_dim=32, depth=2, num_heads=2, img_size=28, patch_size=14))
    torch.save({"model": source.state_dict()}, tmp_path / "small.pt")
    command = ["convert", str(tmp_path / "small.pt"), str(tmp_path / "out"), "--model", "eva_tiny_p16",
               "--set", "depth=2", "--set", "img_size=32"]
    assert main(command) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and "left at initialisation" in captured.err
    assert not (tmp_path / "out").exists()
    assert main(command + ["--non-strict"]) == 0
    printed = capsys.readouterr().out
    assert len([line for line in printed.splitlines() if "NOT MATCHED" in line]) == 1
    assert "shape mismatch" not in printed and (tmp_path / "out" / "model.safetensors").exists()


def test_convert_reports_a_plain_state_dict_as_such(tmp_path, capsys):
    source = _randomized(EvaViTConfig(embed_dim=32, depth=2, num_heads=2, img_size=28, patch_size=14))
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    assert main(["convert", str(tmp_path / "plain.pth"), str(tmp_path / "out"), "--num-heads", "2"]) == 0
    printed = capsys.readouterr().out
    assert "from a plain state dict" in printed and "'state_dict'" not in printed


# ------------------------------------------------------------------------------- source configs (defect 6)
def test_convert_uses_the_config_of_an_evamim_directory(tmp_path):
    """A size no preset has, non-square, with RoPE: everything comes from the directory's config.json."""
    config = EvaViTConfig(embed_dim=40, depth=2, num_heads=5, img_size=(28, 42), patch_size=14, use_rope=True,
                          rope_ref_grid=(3, 3), num_classes=3)
    source = _randomized(config)
    evamim.save_pretrained(source, tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    converted = evamim.create_model(pretrained=tmp_path / "out")
    assert converted.config == source.config
    # Reloading at another size resamples from the saved 2x3 grid (users cannot pass an old grid).
    bigger = evamim.create_model(pretrained=tmp_path / "out", img_size=(42, 56))
    expected = resample_pos_embed(source.pos_embed.detach(), (3, 4), (2, 3))
    torch.testing.assert_close(bigger.pos_embed.detach(), expected)


def test_convert_reads_an_evamim_training_checkpoint(tmp_path, capsys):
    run_config = {"model": {"name": "eva02_tiny_p14", "options": {"embed_dim": 64, "depth": 2, "num_heads": 4}},
                  "data": {"image_size": 56}}
    student_config = evamim.models.presets.model_config(
        "eva02_tiny_p14", embed_dim=64, depth=2, num_heads=4, img_size=56, use_mask_token=True, mim_head_dim=24,
        global_pool="token")
    student = _randomized(student_config)
    checkpoint = {"format": "evamim-train-checkpoint", "version": 1, "model": student.state_dict(),
                  "optimizer": {}, "config": run_config, "step": 5}
    torch.save(checkpoint, tmp_path / "step-000000005.pt")
    assert main(["convert", str(tmp_path / "step-000000005.pt"), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "loaded evamim training checkpoint weights from 'model'" in printed
    assert "the training checkpoint's config (preset 'eva02_tiny_p14')" in printed
    converted = evamim.create_model(pretrained=tmp_path / "out").eval()
    assert converted.config.use_rope and converted.config.rope_ref_grid == (16, 16)
    assert converted.config.mim_head_dim == 24 and converted.config.global_pool == "token"
    torch.testing.assert_close(_outputs(converted, 56), _outputs(student, 56))


# ----------------------------------------------------------------------------------- export (defect 4)
@pytest.mark.parametrize("to", ["timm", "open_clip"])
def test_convert_writes_timm_and_open_clip_weights(tmp_path, capsys, to):
    timm_eva = pytest.importorskip("timm.models.eva")
    from safetensors.torch import load_file

    source = _randomized(EvaViTConfig(**EVA02_TINY))
    torch.save({"module": official_eva02_state_dict(source)}, tmp_path / "eva02.pt")
    assert main(["convert", str(tmp_path / "eva02.pt"), str(tmp_path / "out"), "--to", to]) == 0
    kwargs = json.loads((tmp_path / "out" / "timm_kwargs.json").read_text())
    assert kwargs["qkv_fused"] is False  # timm's own layout for EVA-02 with sub-LN
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    if to == "open_clip":
        assert all(key.startswith("visual.trunk.") for key in state)
        state = {key[len("visual.trunk."):]: value for key, value in state.items()}
    reference = timm_eva.Eva(**kwargs).eval()
    reference.load_state_dict(state, strict=True)
    torch.testing.assert_close(_outputs(reference, 56), _outputs(source, 56), atol=1e-5, rtol=1e-5)


def test_mim_heads_are_named_when_left_out_of_a_timm_export(tmp_path, capsys):
    source = _randomized(EvaViTConfig(embed_dim=32, depth=2, num_heads=2, img_size=28, patch_size=14,
                                      use_mask_token=True, mim_head_dim=24, global_pool="token"))
    torch.save({"model": official_eva01_mim_state_dict(source)}, tmp_path / "mim.pt")
    assert main(["convert", str(tmp_path / "mim.pt"), str(tmp_path / "out"), "--num-heads", "2", "--to", "timm"]) == 0
    printed = capsys.readouterr().out
    assert "not exported (timm's Eva has no MIM head): mask_token, lm_head.weight, lm_head.bias" in printed
