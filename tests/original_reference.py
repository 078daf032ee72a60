"""Reference modules from the `laion-clap` PyPI package (its `clap_module` model code).

Install (never letting pip resolve torch): see requirements-reference.txt. Only the model
files run: `laion_clap/__init__.py` imports the training hook (wget, webdataset, wandb, ...)
and `clap_module/__init__.py` torchvision transforms and the tokenizer (ftfy), none of which
the model code needs, so both packages are registered as bare namespace packages.
"""

import contextlib
import functools
import importlib.machinery
import importlib.util
import pathlib
import sys
import types


@contextlib.contextmanager
def _stubs_while_importing():
  """`clap_module/utils.py` imports torchvision's FrozenBatchNorm2d and h5py at its top, for
  helpers the model never calls (freezing batch norms, reading dataset indexes). Stubs stand
  in only during the import: left in sys.modules they would make transformers' availability
  checks (`importlib.util.find_spec`) fail for the rest of the test session."""
  added = []
  stubs = {"torchvision": {}, "torchvision.ops": {},
           "torchvision.ops.misc": {"FrozenBatchNorm2d": type("FrozenBatchNorm2d", (), {})},
           "h5py": {}}
  missing = {top for top in ("torchvision", "h5py") if importlib.util.find_spec(top) is None}
  for name, attrs in stubs.items():
    if name.split(".")[0] in missing and name not in sys.modules:
      module = types.ModuleType(name)
      module.__dict__.update(attrs)
      sys.modules[name] = module
      added.append(name)
  try:
    yield
  finally:
    for name in added:
      sys.modules.pop(name, None)


@functools.cache
def laion_clap_modules():
  """(laion_clap.clap_module.htsat, laion_clap.clap_module.model)."""
  spec = importlib.util.find_spec("laion_clap")
  if spec is None:
    raise ImportError("the laion-clap reference is not installed: "
                      "pip install --no-deps -r requirements-reference.txt")
  root = pathlib.Path(spec.origin).parent
  for name, path in (("laion_clap", root), ("laion_clap.clap_module", root / "clap_module")):
    if name not in sys.modules:
      package = types.ModuleType(name)
      package.__path__ = [str(path)]
      # A spec, so that importlib.util.find_spec keeps working on the package.
      package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
      package.__spec__.submodule_search_locations = [str(path)]
      sys.modules[name] = package
  with _stubs_while_importing():
    from laion_clap.clap_module import htsat, model
  return htsat, model


def randomize_(model, seed: int = 0):
  """Random values in every float tensor of an original (LAION-CLAP / HTS-AT) model, in place.

  As `hf_reference.randomize_`, except the tensors that are constants of the original code,
  not weights: the torchlibrosa front end (DFT matrices, mel filterbank) and the shifted-window
  masks (`attn_mask`), which hade_jax rebuilds itself.
  """
  import torch

  constants = ("spectrogram_extractor.", "logmel_extractor.", "audio_feats_extractor.",
               "attn_mask")
  torch.manual_seed(seed)
  with torch.no_grad():
    for key, value in model.state_dict().items():
      if not value.is_floating_point() or any(c in key for c in constants):
        continue
      if key.endswith("running_mean"):
        value.copy_(-40.0 + 5.0 * torch.randn_like(value))
      elif key.endswith("running_var"):
        value.copy_(100.0 + 300.0 * torch.rand_like(value))
      elif key.startswith("logit_scale") or key == "temp":
        value.copy_(torch.tensor(2.5 if key != "temp" else 0.05))
      else:
        value.copy_(0.2 * torch.randn_like(value))
  return model.eval()


def small_htsat(htsat_module, config, depths=(2, 1, 2, 1)):
  """A small original HTS-AT (128 x 128 image from 512 frames x 32 mels, window 4, width 16)."""
  return htsat_module.HTSAT_Swin_Transformer(
      spec_size=128, patch_size=4, patch_stride=(4, 4), num_classes=10, embed_dim=16,
      depths=list(depths), num_heads=[2, 2, 4, 4], window_size=4, config=config)


def stage_outputs(swin, run):
  """Runs `run()` and returns the original Swin's patch-embedding, per-stage and final-norm
  token outputs [B, H*W, C], captured with forward hooks."""
  captured = []
  modules = [swin.patch_embed, *swin.layers, swin.norm]
  hooks = [m.register_forward_hook(
      lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
      for m in modules]
  try:
    result = run()
  finally:
    for h in hooks:
      h.remove()
  return result, captured


def assert_stages_match(pooled_BxC, aux, captured, ref_out, atol):
  """hade_jax HtsatModel outputs == the original HTS-AT's, stage by stage.

  `captured`: `stage_outputs`' tokens; `ref_out`: the original `forward_features` dict.
  """
  import numpy as np

  *stages, final = captured
  assert len(stages) == len(aux["hidden_states"])
  for i, (got_BxCxHxW, want_BxNxC) in enumerate(zip(aux["hidden_states"], stages, strict=True)):
    b, c, h, w = got_BxCxHxW.shape
    want = want_BxNxC.numpy().reshape(b, h, w, c).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(np.asarray(got_BxCxHxW), want, atol=atol, rtol=0,
                               err_msg=f"hidden_states[{i}] (0 = patch embedding)")
  np.testing.assert_allclose(np.asarray(pooled_BxC), ref_out["embedding"].numpy(), atol=atol,
                             rtol=0, err_msg="pooled embedding")
  np.testing.assert_allclose(np.asarray(pooled_BxC), final.numpy().mean(axis=1), atol=atol,
                             rtol=0, err_msg="final norm")
  # The original's fine-grained embedding repeats each stage-4 frame 8 * stride times: its
  # frames in time order, which hade_jax's THA frames must equal.
  frames_BxTxC = np.asarray(aux["frames"][-1])
  step = ref_out["fine_grained_embedding"].shape[1] // frames_BxTxC.shape[1]
  np.testing.assert_allclose(frames_BxTxC, ref_out["fine_grained_embedding"].numpy()[:, ::step],
                             atol=atol, rtol=0, err_msg="stage-4 frames")
