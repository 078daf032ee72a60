"""Helpers for the *_vs_reference tests: HF PyTorch models with every tensor random."""

import torch


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Fills every float tensor of a CLAP-family model with random values, in place.

  HF zero-initialises some tensors (biases, relative-position tables), which would hide
  layout mistakes. Batch-norm statistics get dB-like values around the log-mel range; logit
  scales stay positive.
  """
  torch.manual_seed(seed)
  with torch.no_grad():
    for key, value in model.state_dict().items():
      if not value.is_floating_point():
        continue
      if key.endswith("running_mean"):
        value.copy_(-40.0 + 5.0 * torch.randn_like(value))
      elif key.endswith("running_var"):
        value.copy_(100.0 + 300.0 * torch.rand_like(value))
      elif key.startswith("logit_scale"):
        value.copy_(torch.tensor(2.5 if key.endswith("_t") else 1.0))
      else:
        value.copy_(0.2 * torch.randn_like(value))
  return model.eval()
