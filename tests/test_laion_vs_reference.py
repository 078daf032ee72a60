"""LAION-CLAP's own `.pt` checkpoints imported with `convert.laion.load_laion_clap` equal the
`laion-clap` package's CLAP model (non-fusion), stage by stage.

The reference is `laion_clap.clap_module.model.CLAP` itself, built without downloads: its
HTS-AT factory returns a small HTS-AT and its `RobertaModel` / `BertModel.from_pretrained`
a small random tower of width 768 (CLAP hard-codes Linear(768, joint) after it). It is saved
as LAION's training script saves it: `{'epoch', 'name', 'state_dict'}` with `module.` keys.
"""

import dataclasses
import types

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from hade_jax import frontend
from hade_jax import heads as hade_heads
from hade_jax.convert import common, laion, original, torch_ckpt
from tests import original_reference

TOL = 1e-4
MEL = frontend.LogMelConfig(sample_rate=16000, n_fft=512, hop_length=160, n_mels=32,
                            f_min=50.0, f_max=8000.0)
AUDIO_CFG = dict(model_type="HTSAT", model_name="tiny", sample_rate=16000, window_size=512,
                 hop_size=160, fmin=50, fmax=8000, mel_bins=32, clip_samples=511 * 160,
                 class_num=10)
TEXT = dict(vocab_size=120, hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
            intermediate_size=64, max_position_embeddings=40)
JOINT = 24


def _text_tower(variant):
  if variant == "roberta":
    cfg = transformers.RobertaConfig(**TEXT, type_vocab_size=1, pad_token_id=1,
                                     layer_norm_eps=1e-5)
    return transformers.RobertaModel(cfg)
  return transformers.BertModel(transformers.BertConfig(**TEXT))


def build_reference(variant, monkeypatch):
  htsat_module, model_module = original_reference.laion_clap_modules()
  small = lambda audio_cfg, enable_fusion=False, fusion_type="None": (  # noqa: E731
      original_reference.small_htsat(htsat_module, audio_cfg))
  monkeypatch.setattr(model_module, "create_htsat_model", small)
  towers = types.SimpleNamespace(from_pretrained=lambda name, **kw: _text_tower(variant))
  monkeypatch.setattr(model_module, "RobertaModel", towers)
  monkeypatch.setattr(model_module, "BertModel", towers)
  torch.manual_seed(0)
  text_cfg = dict(context_length=77, vocab_size=120, width=512, heads=8, layers=12,
                  model_type=variant)
  ref = model_module.CLAP(embed_dim=128, audio_cfg=AUDIO_CFG, text_cfg=text_cfg,
                          joint_embed_shape=JOINT)
  return original_reference.randomize_(ref)


def save_like_laion(ref, path):
  state = {"module." + k: v for k, v in ref.state_dict().items()}
  # The released files were written with transformers < 4.31, whose RoBERTa/BERT kept the
  # position ids as a persistent buffer (LAION's loader deletes it on newer versions).
  state["module.text_branch.embeddings.position_ids"] = torch.arange(TEXT[
      "max_position_embeddings"])[None]
  torch.save({"epoch": 45, "name": "2023_test", "state_dict": state}, path)
  return path


def _inputs(variant, seed=0):
  rng = np.random.RandomState(seed)
  wave = (0.3 * rng.randn(2, AUDIO_CFG["clip_samples"])).astype(np.float32)
  lengths = [9, 4, 12]
  ids = rng.randint(3, 120, size=(3, 12))
  ids[:, 0] = 0
  mask = (np.arange(12)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
  ids = np.where(mask > 0, ids, 1 if variant == "roberta" else 0)
  return wave, ids, mask


@pytest.mark.parametrize("variant", ["roberta", "bert"])
def test_laion_clap_pt_imports_exactly(variant, monkeypatch, tmp_path):
  ref = build_reference(variant, monkeypatch)
  path = save_like_laion(ref, tmp_path / "630k-audioset-best.pt")
  model, report = laion.load_laion_clap(path, mel=MEL)
  assert not report.missing and not report.unused, str(report)
  assert {"logit_scale_a", "text_branch.embeddings.position_ids",
          "audio_transform.sequential.0.weight", "text_transform.sequential.3.bias",
          "audio_branch.tscam_conv.weight"} <= set(report.expected_unused)
  assert model.cfg.text.variant == variant and model.cfg.heads.embed_dim == JOINT
  assert model.cfg.heads.text_pool == "pooler" and model.cfg.text.add_pooler

  wave, ids, mask = _inputs(variant)
  text = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
          "token_type_ids": torch.zeros_like(torch.from_numpy(ids))}
  with torch.no_grad():
    w = torch.from_numpy(wave)
    ref_mel = ref.audio_branch.logmel_extractor(ref.audio_branch.spectrogram_extractor(w))[:, 0]
    ref_out, captured = original_reference.stage_outputs(
        ref.audio_branch, lambda: ref.encode_audio({"waveform": w}, device="cpu"))
    ref_audio_emb = ref.get_audio_embedding([{"waveform": x} for x in w])
    ref_text = ref.text_branch(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                               output_hidden_states=True)
    ref_text_emb = ref.get_text_embedding(dict(text))
    logit_t = ref.logit_scale_t.exp()

  # One compiled program for every output (XLA merges the repeated tower calls).
  @jax.jit
  def run(mel, ids, mask):
    return (model.audio_encoder(mel), model.text_encoder(ids, mask),
            model.encode_audio_mel(mel), model.encode_text(ids, mask))

  (pooled, aux), (_, taux), a, t = run(ref_mel.numpy(), ids, mask)
  original_reference.assert_stages_match(pooled, aux, captured, ref_out, TOL)
  valid = mask.astype(bool)
  for i, (got, want) in enumerate(zip(taux["hidden_states"], ref_text.hidden_states,
                                      strict=True)):
    np.testing.assert_allclose(np.asarray(got)[valid], want.numpy()[valid], atol=TOL, rtol=0,
                               err_msg=f"text hidden_states[{i}]")
  np.testing.assert_allclose(taux["pooled"], ref_text.pooler_output.numpy(), atol=TOL, rtol=0)
  # The embeddings (hade_jax's front end equals the original's: test_htsat_original_vs_reference).
  np.testing.assert_allclose(hade_heads.normalize(a.global_AxD), ref_audio_emb.numpy(),
                             atol=TOL, rtol=0)
  np.testing.assert_allclose(hade_heads.normalize(t.global_TxD), ref_text_emb.numpy(),
                             atol=TOL, rtol=0)
  # LAION's text->audio logits: exp(logit_scale_t) * cosine.
  logits_AxT = model.heads.logit_scale_value() * model.score(a, t)["global"]
  want_TxA = logit_t.item() * ref_text_emb.numpy() @ ref_audio_emb.numpy().T
  np.testing.assert_allclose(np.asarray(logits_AxT).T, want_TxA, atol=TOL * 20, rtol=1e-5)


@pytest.mark.parametrize("name,width,depths", [("tiny", 96, (2, 2, 6, 2)),
                                               ("base", 128, (2, 2, 12, 2))])
def test_laion_htsat_geometries_are_read_from_the_file(name, width, depths):
  """LAION's real HTSAT-tiny / HTSAT-base branches (its own factory): shapes and names."""
  htsat_module, model_module = original_reference.laion_clap_modules()
  audio_cfg = model_module.CLAPAudioCfp(**{**AUDIO_CFG, "model_name": name, "mel_bins": 64,
                                           "sample_rate": 48000, "hop_size": 480,
                                           "window_size": 1024, "fmax": 14000})
  branch = htsat_module.create_htsat_model(audio_cfg)
  tensors = {"audio_branch." + k: v.numpy() for k, v in branch.state_dict().items()}
  cfg = original.htsat_config_from_state_dict(tensors, laion.AUDIO_PREFIX)
  assert (cfg.spec_size, cfg.num_mel_bins, cfg.window_size, cfg.freq_ratio) == (256, 64, 8, 4)
  assert cfg.patch_embeds_hidden_size == width and cfg.depths == depths
  assert cfg.num_attention_heads == (4, 8, 16, 32) and cfg.mlp_ratio == 4.0
  # The filterbank LAION stores is hade_jax's LAION-CLAP front end.
  assert original.check_filterbank(tensors, laion.AUDIO_PREFIX, frontend.LogMelConfig.laion_clap(),
                                   name)
  renamed, origin, unused = original.htsat_to_hf(tensors, laion.AUDIO_PREFIX)
  qkv = tensors["audio_branch.layers.2.blocks.5.attn.qkv.weight"]
  key = renamed["audio_encoder.layers.2.blocks.5.attention.self.key.weight"]
  np.testing.assert_array_equal(key, qkv[qkv.shape[0] // 3: 2 * qkv.shape[0] // 3])
  assert origin["audio_encoder.layers.2.blocks.5.attention.self.key.weight"] == (
      "audio_branch.layers.2.blocks.5.attn.qkv.weight")
  assert "audio_branch.layers.0.blocks.1.attn_mask" in unused


def test_laion_errors(monkeypatch, tmp_path):
  ref = build_reference("roberta", monkeypatch)
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  state["text_branch.embeddings.position_ids"] = np.arange(TEXT["max_position_embeddings"])[None]
  with pytest.raises(common.ConversionError, match="64 mel bins, the audio tower 32"):
    laion.config_from_state_dict(state)  # LAION's real front end, 64 mels
  with pytest.raises(common.ConversionError, match="mel filterbank"):
    laion.config_from_state_dict(state, mel=dataclasses.replace(MEL, sample_rate=32000))
  cfg = laion.config_from_state_dict(state, mel=MEL)
  fused = dict(state, **{"audio_branch.patch_embed.mel_conv2d.weight": np.zeros((16, 1, 4, 12))})
  with pytest.raises(common.ConversionError, match="feature fusion"):
    laion.config_from_state_dict(fused, mel=MEL)
  model = laion.hade.HadeModel(cfg, rngs=nnx.Rngs(0))
  partial = {k: v for k, v in state.items() if k != "text_projection.2.bias"}
  with pytest.raises(common.ConversionError, match=r"text_projection\.2\.bias"):
    laion.import_laion_clap(model, partial)
  # The DDP prefix is removed; LAION's wrapper dict is unwrapped; other entries are kept.
  ckpt = torch_ckpt.read(save_like_laion(ref, tmp_path / "x.pt"))
  assert ckpt.meta == {"epoch": 45, "name": "2023_test"}
  assert set(ckpt.tensors) == set(state)
