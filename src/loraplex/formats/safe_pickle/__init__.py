"""Read torch checkpoints without executing any of them: one module per reader family.

`restricted` is the core every reader shares (the allow-list, its stand-ins, the restricted unpicklers);
`torch_zip` opens a `torch.save` zip and reads plain state dicts; `dcp` reads a torch distributed checkpoint's
.metadata and its chunks; `xser` reads torch_xla's xser saves (NxD's use_xser=True); `lightning` reads the whole
Lightning checkpoint NxD's NeuronCheckpointIO writes.
"""
